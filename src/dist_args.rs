//! `simclr run`'s data-parallel flags: several processes or machines, one rank each
//! (`--world-size`, `--rank`, `--coordinator`), also read from the variables torchrun and
//! SLURM-style launchers set (`WORLD_SIZE`, `RANK`, `MASTER_ADDR`, `MASTER_PORT`).

use std::time::Duration;

use simclr_train::dist::{check_process_group, set_process_group, set_timeout, ProcessGroup};

use crate::failure::Failure;

#[derive(clap::Args, Debug, Default, Clone)]
pub struct DistArgs {
    /// Processes in a data-parallel run (each trains on its share of every global batch).
    #[arg(long, env = "WORLD_SIZE", value_name = "W")]
    pub world_size: Option<usize>,
    /// This process's rank, 0..W; rank 0 hosts the coordinator and writes the run directory.
    #[arg(long, env = "RANK", value_name = "R")]
    pub rank: Option<usize>,
    /// Rank 0's HOST:PORT (its coordinator listens there; rank r also uses PORT + 1 + r)
    /// [default: $MASTER_ADDR:$MASTER_PORT].
    #[arg(long, value_name = "HOST:PORT")]
    pub coordinator: Option<String>,
    /// Seconds a rank waits for the others in one exchange before it stops with an error
    /// naming them (a rank died or stalled).
    #[arg(long, env = "SIMCLR_PEER_TIMEOUT", value_name = "SECONDS", default_value_t = 300)]
    pub peer_timeout: u64,
}

/// Makes this process a rank of the group the flags describe, or says what is wrong (exit 2):
/// a rank out of range, no coordinator, a coordinator port in use or that never answers.
pub fn setup(args: &DistArgs) -> Result<(), Failure> {
    if args.peer_timeout == 0 {
        return Err(Failure::Invalid("error: --peer-timeout must be at least 1 second".into()));
    }
    let timeout = Duration::from_secs(args.peer_timeout);
    let world = args.world_size.unwrap_or(1);
    if world == 0 {
        return Err(Failure::Invalid("error: --world-size (WORLD_SIZE) must be at least 1".into()));
    }
    if world == 1 {
        if args.rank.is_some_and(|r| r != 0) {
            return Err(Failure::Invalid(format!(
                "error: --rank {} needs --world-size above it (WORLD_SIZE); alone, a process is rank 0",
                args.rank.unwrap_or(0)
            )));
        }
        set_timeout(timeout);
        return Ok(());
    }
    let Some(rank) = args.rank else {
        return Err(Failure::Invalid(format!(
            "error: --world-size {world} needs --rank R (or RANK), 0 <= R < {world}, different for each process"
        )));
    };
    if rank >= world {
        return Err(Failure::Invalid(format!(
            "error: --rank {rank} is not below --world-size {world}: ranks go from 0 to {}",
            world - 1
        )));
    }
    let coordinator = match (&args.coordinator, std::env::var("MASTER_ADDR"), std::env::var("MASTER_PORT")) {
        (Some(c), _, _) => c.clone(),
        (None, Ok(a), Ok(p)) => format!("{a}:{p}"),
        _ => {
            return Err(Failure::Invalid(
                "error: a run over several processes needs --coordinator HOST:PORT (rank 0's address), or MASTER_ADDR and MASTER_PORT".into(),
            ))
        }
    };
    let group = ProcessGroup { rank, world, coordinator, timeout };
    // Ctrl-C / SIGTERM become this rank's vote; the runtime stops on the agreed flag.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    simclr_train::dist::set_interrupt_flags(crate::signals::interrupt_flag(), stop);
    let invalid = |e: simclr_train::dist::PeerError| Failure::Invalid(format!("error: {e}"));
    check_process_group(&group).map_err(invalid)?;
    set_process_group(group).map_err(invalid)?;
    eprintln!("rank {rank} of {world}: connected");
    Ok(())
}
