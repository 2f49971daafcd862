//! Unlearning: DeepCUT and the baselines on the same forget/retain streams, the stopping
//! rule, and the run folder (model/, forget.txt, report.json, report.html, checkpoints/).
pub mod deepcut;
pub mod methods;
pub mod run;
pub mod sisa;

use serde::{Deserialize, Serialize};

/// `--method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Deepcut,
    Finetune,
    GradientAscent,
    #[value(name = "neggrad+")]
    #[serde(rename = "neggrad+")]
    NeggradPlus,
    RandomLabels,
    Retrain,
    Sisa,
}

impl Method {
    pub fn name(&self) -> &'static str {
        match self {
            Method::Deepcut => "deepcut",
            Method::Finetune => "finetune",
            Method::GradientAscent => "gradient-ascent",
            Method::NeggradPlus => "neggrad+",
            Method::RandomLabels => "random-labels",
            Method::Retrain => "retrain",
            Method::Sisa => "sisa",
        }
    }
}
