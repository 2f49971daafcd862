//! Training machinery shared by fine-tuning and every unlearning method: the optimiser
//! schedule, the step, run checkpoints.
pub mod checkpoint;
pub mod finetune;
pub mod optim;
pub mod readback;
pub mod schedule;
