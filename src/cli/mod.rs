//! The `deepcut-fast` command line: clap subcommands, each in its own file. Logs and
//! progress go to stderr, results to files (and readable tables to stdout).
mod bench;
mod compare;
mod devices;
mod eval;
mod predict;
mod run;
pub mod selfcheck;
mod train;

use crate::backend::Precision;
use crate::error::{Error, Result};
use crate::train::optim::LossScaling;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "deepcut-fast",
    version,
    about = "DeepCUT machine unlearning for BERT/RoBERTa token classifiers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tag the words of a CoNLL file with a trained token classifier.
    Predict(predict::PredictArgs),
    /// Entity F1 (seqeval) on a dataset's splits and the membership-inference AUC.
    Eval(eval::EvalArgs),
    /// Fine-tune a pretrained encoder into a token classifier.
    Train(train::TrainArgs),
    /// Unlearn a forget set (DeepCUT or a baseline) and report what happened.
    Run(run::RunArgs),
    /// One page comparing several runs: metrics table and forget-vs-retain trade-off plot.
    Compare(compare::CompareArgs),
    /// Time full DeepCUT training steps on synthetic tokens (random-init weights) and
    /// print step time, tokens/s, FLOPs, TFLOP/s, MFU and peak memory as JSON.
    Bench(bench::BenchArgs),
    /// What this binary and machine can run on: kernel images, CPU, CUDA driver, the cuBLAS
    /// and NVTX files opened, each GPU with its self-check, and what `--device auto` picks.
    Devices(devices::DevicesArgs),
}

/// Options every command that runs a model shares.
#[derive(Args, Clone, Debug)]
pub struct DeviceArgs {
    /// auto | cpu | cuda[:N]. auto uses a GPU when one is usable and passes the self-check
    /// (one DeepCUT step against the CPU backend), else the CPU backend.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// fp32 | bf16 | fp16 (SPEC section 7): activations and GEMM/attention inputs rounded
    /// to bf16/fp16 with fp32 accumulation; weights, optimiser state, LayerNorm statistics
    /// and losses stay fp32; fp16 trains with dynamic loss scaling. Buffers stay fp32 on
    /// both backends (fp32 memory); the CPU computes at fp32 speed, CUDA runs the GEMMs,
    /// attention and InfoNCE on tensor cores. Default: bf16 on CUDA (SPEC), fp32 on the CPU.
    #[arg(long = "precision", value_name = "PRECISION", value_parser = parse_precision)]
    pub precision_flag: Option<Precision>,
    /// The precision in force: `--precision`, else the chosen device's default; set by
    /// `init`.
    #[arg(skip)]
    pub precision: Precision,
}

fn parse_precision(s: &str) -> std::result::Result<Precision, String> {
    s.parse()
}

/// fp16 dynamic loss scaling options of the commands that train (`train`, `run`).
#[derive(Args, Clone, Debug)]
pub struct LossScaleArgs {
    /// fp16 only: initial loss scale, a power of two (SPEC section 7: 2^16). A step whose
    /// gradients overflow is skipped and the scale halved.
    #[arg(long, default_value_t = LossScaling::default().init)]
    pub loss_scale_init: f32,
    /// fp16 only: the loss scale doubles after this many steps in a row without overflow.
    #[arg(long, default_value_t = LossScaling::default().growth_interval)]
    pub loss_scale_growth_interval: u64,
}

impl LossScaleArgs {
    pub fn config(&self) -> Result<LossScaling> {
        let ls = LossScaling {
            init: self.loss_scale_init,
            growth_interval: self.loss_scale_growth_interval,
        };
        ls.check()?;
        Ok(ls)
    }
}

impl DeviceArgs {
    /// Sets up threads, picks the compute backend and the precision (`--precision`, else
    /// bf16 on CUDA and fp32 on the CPU), saying which.
    pub fn init(&mut self) -> Result<Device> {
        if let Some(n) = self.threads {
            if n == 0 {
                return Err(Error::invalid("--threads must be at least 1"));
            }
            // The global pool can be built once per process; a second call is harmless.
            let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
        }
        crate::backend::cpu::gemm::configure_threads(rayon::current_num_threads());
        let flag = self.precision_flag;
        let detail = |p: Precision| match p {
            Precision::Fp32 => String::new(),
            p => format!("; precision {}", p.describe()),
        };
        let cpu = |me: &mut Self| {
            me.precision = flag.unwrap_or(Precision::Fp32);
            eprintln!(
                "backend: cpu (fp32, {} threads){}",
                rayon::current_num_threads(),
                detail(me.precision)
            );
            Ok(Device::Cpu)
        };
        match self.device.clone().as_str() {
            "cpu" => cpu(self),
            // auto picks a GPU only if it passes the self-check (selfcheck.rs): a user must
            // not get results from kernels that disagree with the CPU reference there
            "auto" => {
                crate::backend::cuda::libs::ensure_cublas_names();
                if !crate::backend::cuda::is_available() {
                    eprintln!("device auto: no usable GPU; using the CPU backend");
                    return cpu(self);
                }
                let precision = flag.unwrap_or(Precision::Bf16);
                match selfcheck::check(0, precision) {
                    Ok(msg) => {
                        self.precision = precision;
                        eprintln!("device auto: {msg}{}", detail(precision));
                        Ok(Device::Cuda(0))
                    }
                    Err(why) => {
                        eprintln!("device auto: a GPU is usable but {why}; using the CPU backend");
                        cpu(self)
                    }
                }
            }
            d if d == "cuda" || d.starts_with("cuda:") => {
                let ordinal = match d.strip_prefix("cuda:") {
                    Some(n) => n
                        .parse()
                        .map_err(|_| Error::invalid(format!("--device {d}: expected cuda:N with N a GPU index")))?,
                    None => 0,
                };
                // SPEC section 7: bf16 is the CUDA default
                self.precision = flag.unwrap_or(Precision::Bf16);
                crate::backend::cuda::libs::ensure_cublas_names();
                // without a device, opening it later says why (the driver's message)
                if crate::backend::cuda::is_available() {
                    let msg = selfcheck::check(ordinal, self.precision).map_err(|why| {
                        Error::Device(format!(
                            "--device {d}: {why}. Use --device cpu, or set DEEPCUT_SKIP_SELF_CHECK=1 to run on this GPU anyway"
                        ))
                    })?;
                    eprintln!("backend: {msg}{}", detail(self.precision));
                }
                Ok(Device::Cuda(ordinal))
            }
            d => Err(Error::invalid(format!("--device {d}: expected auto, cpu or cuda[:N]"))),
        }
    }
}

/// The compute backend a command runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

/// Runs `$body` with `$mk` bound to a maker of backends of `$dev` (`$mk()` gives a new
/// handle on the device, one per model; the body is compiled once per backend type).
macro_rules! with_backend {
    ($dev:expr, $mk:ident => $body:expr) => {
        match $dev {
            $crate::cli::Device::Cpu => {
                let $mk = || -> $crate::error::Result<$crate::backend::cpu::Cpu> { Ok($crate::backend::cpu::Cpu) };
                $body
            }
            $crate::cli::Device::Cuda(n) => {
                let $mk = || $crate::backend::cuda::Cuda::new(n);
                $body
            }
        }
    };
}
pub(crate) use with_backend;

/// Makes `out` ready for a run: refuses to write into the input model's folder, refuses
/// an existing folder unless --force (which empties it) or --resume (which needs it).
pub fn prepare_out_dir(out: &std::path::Path, model: &std::path::Path, resume: bool, force: bool) -> Result<()> {
    if crate::model::same_dir(out, model) || crate::model::same_dir(&out.join("model"), model) {
        return Err(Error::invalid(format!(
            "--out {}: would overwrite the input model {}",
            out.display(),
            model.display()
        )));
    }
    if resume && force {
        return Err(Error::invalid(
            "--resume and --force conflict: --force starts over, --resume continues",
        ));
    }
    let exists = out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true);
    if resume {
        if !out.join("checkpoints").exists() {
            return Err(Error::invalid(format!(
                "--resume: {} has no checkpoints/ to resume from",
                out.display()
            )));
        }
        // A process killed while writing leaves its temp files behind (as large as a checkpoint).
        let stale = crate::util::remove_stale_temp_files(out)?;
        if stale > 0 {
            eprintln!(
                "{}: removed {stale} temp file(s) left by an interrupted write",
                out.display()
            );
        }
    } else if exists {
        if !force {
            return Err(Error::invalid(format!(
                "--out {} exists and is not empty; pass --force to overwrite it or --resume to continue it",
                out.display()
            )));
        }
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    // checkpoints/ first: it marks the folder as a run that --resume may continue, even
    // when the process is killed before its first checkpoint.
    let ckpt = out.join("checkpoints");
    std::fs::create_dir_all(&ckpt).map_err(|e| Error::io(&ckpt, e))
}

/// Runs the command line; returns the process exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let res = match cli.command {
        Command::Predict(a) => predict::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Train(a) => train::run(a),
        Command::Run(a) => run::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Devices(a) => devices::run(a),
    };
    match res {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolved(device: &str, flag: Option<Precision>) -> (Device, Precision) {
        let mut d = DeviceArgs {
            device: device.to_string(),
            threads: None,
            precision_flag: flag,
            precision: Precision::Fp16, // overwritten by init
        };
        let dev = d.init().expect("a valid device string");
        (dev, d.precision)
    }

    /// SPEC section 7: bf16 by default on CUDA, fp32 on the CPU; `--precision` wins on both.
    /// (Without a GPU init does not open the device, so this runs here; with one, the
    /// self-check runs first.)
    #[test]
    fn precision_defaults_by_device() {
        assert_eq!(resolved("cpu", None), (Device::Cpu, Precision::Fp32));
        assert_eq!(resolved("cuda", None), (Device::Cuda(0), Precision::Bf16));
        assert_eq!(resolved("cuda:1", None), (Device::Cuda(1), Precision::Bf16));
        assert_eq!(
            resolved("cuda", Some(Precision::Fp32)),
            (Device::Cuda(0), Precision::Fp32)
        );
        assert_eq!(resolved("cpu", Some(Precision::Fp16)), (Device::Cpu, Precision::Fp16));
        // without a GPU auto is the CPU, with the CPU's default
        if !crate::backend::cuda::is_available() {
            assert_eq!(resolved("auto", None), (Device::Cpu, Precision::Fp32));
        }
    }
}
