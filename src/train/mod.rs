//! Training machinery shared by fine-tuning and every unlearning method: the optimiser
//! schedule, the step, run checkpoints.
pub mod schedule;
