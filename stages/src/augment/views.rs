//! `views`: copies the decoded image into `count` views (two for SimCLR).

use std::sync::Arc;

use serde::Deserialize;
use simclr_core::{
    Context, MapStage, Payload, PortType, Problem, Role, Sample, SampleCtx, Stage, StageConfig, StageError,
};

#[derive(Clone, Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Views {
    /// Views per image.
    #[serde(default = "two")]
    pub count: u32,
}

fn two() -> u32 {
    2
}

impl StageConfig for Views {
    const KIND: &'static str = "views";
    const ABOUT: &'static str = "copies each decoded image into `count` views (default 2)";
    const ROLE: Role = Role::Map;
    fn ports(&self) -> (PortType, PortType) {
        (PortType::Views, PortType::Views)
    }
    fn check(&self, _cx: &Context, out: &mut Vec<Problem>) {
        if !(1..=16).contains(&self.count) {
            out.push(Problem::new("count", "`count` must be from 1 to 16", "SimCLR uses `count: 2`"));
        }
    }
    fn build(&self, _cx: &Context) -> Result<Stage, StageError> {
        Ok(Stage::Map(Arc::new(self.clone())))
    }
}

impl MapStage for Views {
    fn apply(&self, sample: &mut Sample, _ctx: &SampleCtx) -> Result<(), StageError> {
        let Payload::Views(images) = &mut sample.payload else {
            return Err(StageError::fatal("`views` needs a decoded image; put it after `decode`"));
        };
        let Some(first) = images.first().cloned() else {
            return Err(StageError::data("the sample has no image"));
        };
        images.truncate(1);
        images.resize(self.count as usize, first);
        Ok(())
    }
}
