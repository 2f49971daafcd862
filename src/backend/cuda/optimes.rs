//! Device time per op and per phase of a stretch of work, from CUDA events around the
//! ranges the backend already names for NVTX (`Cuda::range` around every op,
//! `Backend::profile_range` around layers, losses and the optimiser): where a step's time
//! goes on a machine without Nsight Systems (`deepcut-fast bench --op-times`). Off by
//! default. On, each range records a pair of timing events on the stream as it opens and
//! closes: nothing waits, and the host reads the events once, at `Cuda::op_times`.
//! A phase's time includes the ops inside it and the gaps between them.
use cudarc::driver::{sys, CudaContext, CudaEvent, CudaStream};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The time of one named range, summed over its calls since timing was switched on.
#[derive(Clone, Debug, PartialEq)]
pub struct OpTime {
    pub name: String,
    /// A phase (`profile_range`: a layer, a loss, the optimiser), which holds ops; else an op.
    pub phase: bool,
    /// An op opened inside another op's range (`adamw_all` inside `clip_adamw_all`): its
    /// time is part of that op's, so sums over ops leave it out.
    pub nested: bool,
    pub ms: f64,
    pub calls: usize,
}

struct Entry {
    name: String,
    phase: bool,
    nested: bool,
    closed: bool,
}

/// The event pairs of the ranges opened since the last `collect`, and a pool of pairs
/// kept for the next stretch (events are created once, not per range).
#[derive(Default)]
pub struct OpTimer {
    pool: Vec<(CudaEvent, CudaEvent)>,
    entries: Vec<Entry>,
    /// Op ranges open now (ranges nest: they are guards dropped in reverse order).
    open_ops: usize,
    /// Why timing stopped (an event could not be made or recorded), said once.
    failed: Option<String>,
}

impl OpTimer {
    /// Opens range `name`: returns its pair's index, None when events fail.
    fn open(&mut self, ctx: &Arc<CudaContext>, stream: &CudaStream, name: &str, phase: bool) -> Option<usize> {
        if self.failed.is_some() {
            return None;
        }
        let i = self.entries.len();
        if self.pool.len() <= i {
            let ev = || ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT));
            match (ev(), ev()) {
                (Ok(a), Ok(b)) => self.pool.push((a, b)),
                (Err(e), _) | (_, Err(e)) => {
                    self.fail(format!("cuEventCreate: {e}"));
                    return None;
                }
            }
        }
        if let Err(e) = self.pool[i].0.record(stream) {
            self.fail(format!("cuEventRecord: {e}"));
            return None;
        }
        self.entries.push(Entry {
            name: name.to_string(),
            phase,
            nested: !phase && self.open_ops > 0,
            closed: false,
        });
        if !phase {
            self.open_ops += 1;
        }
        Some(i)
    }

    fn close(&mut self, i: usize, stream: &CudaStream) {
        if self.failed.is_some() || i >= self.entries.len() {
            return;
        }
        if !self.entries[i].phase {
            self.open_ops = self.open_ops.saturating_sub(1);
        }
        match self.pool[i].1.record(stream) {
            Ok(()) => self.entries[i].closed = true,
            Err(e) => self.fail(format!("cuEventRecord: {e}")),
        }
    }

    fn fail(&mut self, why: String) {
        eprintln!("op times: stopped ({why})");
        self.failed = Some(why);
    }

    /// The summed times by (kind, name) of the ranges since the last call, longest first;
    /// waits for the work they cover. Err names why the events failed.
    pub fn collect(&mut self) -> Result<Vec<OpTime>, String> {
        if let Some(why) = self.failed.take() {
            self.entries.clear();
            self.open_ops = 0;
            return Err(why);
        }
        let mut sums: BTreeMap<(bool, bool, String), (f64, usize)> = BTreeMap::new();
        for (i, e) in self.entries.iter().enumerate().filter(|(_, e)| e.closed) {
            let (a, b) = &self.pool[i];
            let ms = a.elapsed_ms(b).map_err(|err| format!("cuEventElapsedTime: {err}"))?;
            let s = sums.entry((e.phase, e.nested, e.name.clone())).or_default();
            s.0 += ms as f64;
            s.1 += 1;
        }
        self.entries.clear();
        let mut out: Vec<OpTime> = sums
            .into_iter()
            .map(|((phase, nested, name), (ms, calls))| OpTime {
                name,
                phase,
                nested,
                ms,
                calls,
            })
            .collect();
        out.sort_by(|x, y| y.ms.total_cmp(&x.ms).then_with(|| x.name.cmp(&y.name)));
        Ok(out)
    }
}

/// A timed range: records its closing event when dropped.
pub struct Timed {
    timer: Arc<Mutex<OpTimer>>,
    stream: Arc<CudaStream>,
    pair: usize,
}

impl Timed {
    /// Opens `name` on `timer`, None when events fail.
    pub fn open(
        timer: &Arc<Mutex<OpTimer>>, ctx: &Arc<CudaContext>, stream: &Arc<CudaStream>, name: &str, phase: bool,
    ) -> Option<Timed> {
        let pair = timer.lock().unwrap().open(ctx, stream, name, phase)?;
        Some(Timed {
            timer: timer.clone(),
            stream: stream.clone(),
            pair,
        })
    }
}

impl Drop for Timed {
    fn drop(&mut self) {
        self.timer.lock().unwrap().close(self.pair, &self.stream);
    }
}
