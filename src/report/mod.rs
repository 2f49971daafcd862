//! What a person reads after a run: a self-contained report.html (tables, inline SVG
//! charts, the PCA picture of the forget tokens' embeddings). report.json is written by
//! the run itself; this module only draws.
pub mod compare;
pub mod pca;
pub mod run_report;
pub mod svg;
