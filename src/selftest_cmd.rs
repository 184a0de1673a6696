//! `simclr selftest --device DEVICE [--json]`: a device checked against the CPU.

use simclr_train::selftest::{selftest, SelftestReport};

use crate::failure::Failure;

/// Runs the selftest and prints its table (or JSON). A device that cannot be used is exit 1 with
/// the reason; a disagreement beyond the tolerance is exit 1 after the report.
pub fn run(device: &str, steps: usize, json: bool) -> Result<(), Failure> {
    simclr_train::device::DeviceSpec::parse(device)
        .map_err(|e| Failure::Invalid(format!("error: {e}: {}", simclr_train::device::DEVICE_HINT)))?;
    let report = selftest(device, steps).map_err(|e| Failure::Runtime(format!("error: {e}")))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
    } else {
        print!("{}", table(&report));
    }
    if report.ok {
        Ok(())
    } else {
        Err(Failure::Runtime(format!(
            "selftest FAILED on {}: the device differs from the CPU by {:.2e} (relative), beyond the \
             tolerance {:.0e}{}",
            report.device,
            report.max_rel_diff,
            report.tolerance,
            if report.initial_weights_equal { "" } else { "; its initial weights differ from the CPU's" }
        )))
    }
}

fn table(r: &SelftestReport) -> String {
    let mut s = format!(
        "selftest: {} = {} {} ({})\nprecision {}, tolerance {:.0e} (relative, norm-wise)\n\
         matrix products: {:.2e}; initial weights {}\n\n",
        r.device,
        r.backend,
        r.device_name,
        r.detail,
        r.precision,
        r.tolerance,
        r.matmul_rel_diff,
        if r.initial_weights_equal { "identical" } else { "DIFFER" }
    );
    s.push_str("step  loss cpu   loss device  loss diff  z diff    grad diff (worst)            weights diff (worst)\n");
    for c in &r.per_step {
        s.push_str(&format!(
            "{:>4}  {:<9.6}  {:<11.6}  {:<9.2e}  {:<8.2e}  {:<8.2e} {:<19}  {:<8.2e} {}\n",
            c.step,
            c.loss_cpu,
            c.loss_device,
            c.loss_rel_diff,
            c.z_rel_diff,
            c.grad_rel_diff,
            c.grad_worst,
            c.weights_rel_diff,
            c.weights_worst
        ));
    }
    s.push_str(&format!(
        "\nmax relative difference {:.2e} -> {} ({:.1} s)\n",
        r.max_rel_diff,
        if r.ok { "ok" } else { "FAILED" },
        r.seconds
    ));
    s
}
