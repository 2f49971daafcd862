// A CPU stand-in for the part of the CUDA driver API the engine uses (through cudarc), built
// as libcuda.so together with kernels/*.cu compiled by the C++ compiler (tests/cuda_emu,
// driven by tests/common/cuda_emu.rs). Put its folder first on LD_LIBRARY_PATH and the
// CUDA backend runs unchanged on the CPU: launchers, cudarc plumbing and kernels execute,
// so tests/gpu_parity.rs checks all of them against the CPU backend without a GPU.
//
// Device memory is host memory (a CUdeviceptr is the host address); there is one stream,
// whose work is queued and runs only when the host waits for it ("Deferred work", below),
// and events are markers a wait drains the queue at; modules ignore the image they are
// given and cuModuleGetFunction looks the kernel up by name among the compiled kernel files.
// With CUDA_EMU_KERNEL_REPORT (build.rs's ptxas report) a launch a GPU would refuse for its
// registers or shared memory is refused here too ("what a GPU would refuse to launch"), and
// so are a shuffle that reads a lane not taking part in it (emu_shfl64) and a divergent
// __syncthreads (bar_wait).
// What it cannot show: real GPU timing, the hardware's memory model (fences; races within a
// block and between nearby blocks are the ThreadSanitizer build's, below), driver and
// compiler behaviour of real hardware, cuBLAS's own kernels (tests/cuda_emu/cublas.cpp).
#include <atomic>
#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <deque>
#include <functional>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "cuda_emu.h"

// Sanitizer builds (tests/common/cuda_emu.rs `Sanitizer`).
// EMU_ASAN: everything is built with AddressSanitizer (and UBSan), so a kernel or GEMM that
// reads or writes outside its device buffer, its shared memory or its stack fails where it
// happens, as compute-sanitizer's memcheck would on a GPU; for that, device memory and
// dynamic shared memory are allocated at exactly the size asked for.
// EMU_TSAN: the kernels are built with ThreadSanitizer and this file tells it what orders
// what: each thread of a block is its own TSan fiber, __syncthreads orders memory across
// the block (a warp's shuffle orders none: it exchanges registers), and a block comes after
// the blocks 4 or more before it, not after the 3 just before (see "Slots"). Two threads of
// a block that touch the same memory with no barrier between them are reported, as
// compute-sanitizer's racecheck would: the fiber schedule (which runs a thread until it
// waits) can no longer hide a missing __syncthreads; and so are two nearby blocks that
// touch the same memory with nothing ordering them (which racecheck, whose scope is a
// block, would not report), atomics being relaxed and __threadfence the only order
// between blocks (cuda_emu.h).
#if defined(EMU_ASAN)
#include <sanitizer/common_interface_defs.h>
constexpr bool EMU_EXACT_SIZES = true;
#else
constexpr bool EMU_EXACT_SIZES = false;
#endif
#if defined(EMU_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

#if !defined(__x86_64__) || !defined(__linux__)
#error "tests/cuda_emu switches fiber stacks with x86-64 System V assembly (emu_switch)"
#endif

thread_local EmuThreadState emu_state __attribute__((tls_model("initial-exec")));

// ---- kernel registry ----------------------------------------------------------------------------
// One entry per kernel name: the thunk of each slot's copy of the kernel (EMU_SLOTS copies of
// every kernel object are linked in, each with its own static __shared__ variables; see
// "Slots" below). A CUfunction is a pointer to its entry.
struct EmuKernel {
    std::string name;
    EmuThunk slot[EMU_SLOTS] = {};
    std::vector<size_t> param_sizes;  // emu_register_params
};
static std::map<std::string, EmuKernel>& registry() {
    static std::map<std::string, EmuKernel> r;
    return r;
}
extern "C" void emu_register(const char* name, int slot, EmuThunk thunk) {
    if (slot < 0 || slot >= EMU_SLOTS) {
        fprintf(stderr, "cuda_emu: %s registered for slot %d of %d\n", name, slot, EMU_SLOTS);
        abort();
    }
    EmuKernel& k = registry()[name];
    k.name = name;
    k.slot[slot] = thunk;
}
extern "C" void emu_register_params(const char* name, int n, const size_t* sizes) {
    registry()[name].param_sizes.assign(sizes, sizes + n);
}

// ---- the block engine ---------------------------------------------------------------------------
// The threads of a block are fibers (own stacks, emu_switch) on the launching OS thread, switched only at
// barriers: a block runs deterministically, with no spinning and no OS scheduling.
namespace {
constexpr int MAX_THREADS = 1024;
constexpr size_t STACK = 128 * 1024;

struct Bar {
    int expected = 0, arrived = 0;
    unsigned long long gen = 0;
    const void* site = nullptr;  // where this generation's first arrival called the barrier
};

struct Fiber {
    void* sp = nullptr;  // saved stack pointer while switched out
    char* stack = nullptr;
    bool done = false;
    const Bar* waiting = nullptr;  // the barrier this thread waits at, and its generation then
    unsigned long long wait_gen = 0;
    void* tsan = nullptr;  // EMU_TSAN: this thread's TSan fiber
    void* fake = nullptr;  // EMU_ASAN: this fiber's fake stack while switched out
    // cp.async copies this thread issued and that have not landed (emu_cp_async): group -1
    // until committed, then the thread's commit count at that time
    struct AsyncCopy {
        void* dst;
        const void* src;
        int bytes;
        long group;
    };
    std::vector<AsyncCopy> async;
    long async_groups = 0;
};

// Slots: a block runs in one of EMU_SLOTS slots (block q of a launch, in the order the
// blocks run, in slot q mod EMU_SLOTS), each with its own fibers (stacks, TSan fibers),
// barriers, scratch, dynamic shared memory and copy of the kernels (so of their static
// __shared__ variables). Blocks still run one after another; the slots are for
// ThreadSanitizer (EMU_TSAN, 4 slots; the other builds have 1), which is told that a
// block comes after the blocks EMU_SLOTS or more before it and after every earlier launch,
// but not after the blocks in between: to it, up to EMU_SLOTS blocks run at the same
// time, as on a GPU, so two blocks that touch the same memory without a fence ordering
// them are reported. Reusing a slot's memory needs the order that memory had (a slot's
// stacks and shared memory are fresh to the next block that uses them), hence the window.
struct BlockRun {
    EmuThunk thunk;
    void** params;
    emu_dim3 grid, block, bidx;
    int nthreads;
    Bar bar;
    std::vector<Bar> warp_bars;
    std::vector<uint64_t> shfl;
    // the shuffle round each lane last wrote `shfl` in (0: none in this block), so a shuffle
    // that reads a lane not taking part in it (exited, or past the block's last thread) is
    // caught: on a GPU that value is undefined
    std::vector<unsigned long long> shfl_round;
    std::vector<unsigned char> gather;  // emu_warp_gather: 64 bytes per thread
    std::vector<int> or_slots;
    std::vector<char> smem;
    std::vector<Fiber> fibers;  // one per thread, kept from block to block of this slot
#if defined(EMU_TSAN)
    // The scheduler releases `gate` before a block and every thread acquires it on entry;
    // every thread releases `done` on exit, and the scheduler acquires it before the slot's
    // next block and at the end of the launch.
    char gate, done;
#endif
};
BlockRun slots[EMU_SLOTS];

BlockRun* cur = nullptr;
int cur_tid = 0;
void* sched_sp = nullptr;
unsigned long long progress = 0;  // arrivals at barriers and finished threads
#if defined(EMU_ASAN)
const void* sched_bottom = nullptr;  // the scheduler's stack, as ASan learns it on the first switch
size_t sched_size = 0;
#endif
#if defined(EMU_TSAN)
void* sched_tsan = nullptr;  // the launching thread's own TSan context
#endif
}  // namespace

// Switches stacks: saves the callee-saved registers on the current stack, stores its
// pointer in *from, loads `to` and restores that stack's registers (System V x86-64).
// A few nanoseconds, where glibc's swapcontext makes a system call per switch: the
// emulator switches threads at every barrier and shuffle, millions of times per test.
extern "C" void emu_switch(void** from, void* to);
asm(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");

// Whether environment variable `name` is set to `value` (the emulator's CUDA_EMU_* knobs).
static bool env_is(const char* name, const char* value) {
    const char* v = getenv(name);
    return v && strcmp(v, value) == 0;
}

// CUDA_EMU_MMA=truncate: mma.sync with the tensor cores' truncating accumulation
// (mma_model.h emu_dot_truncated) instead of the CPU twins' fp32 sum.
extern "C" int emu_mma_truncate() {
    static const int on = env_is("CUDA_EMU_MMA", "truncate");
    return on;
}

// CUDA_EMU_MATH=approx: expf, exp2f, logf, log2f and erff off by up to their documented
// error on a GPU (cuda_emu.h emu_ulps) instead of the host's results.
extern "C" int emu_math_approx() {
    static const int on = env_is("CUDA_EMU_MATH", "approx");
    return on;
}

// CUDA_EMU_FILL=nan: fresh device memory and every block's shared memory, dynamic and
// static, are all-ones bytes, a NaN in fp32, bf16 and fp16, instead of the default finite
// garbage (0xCD, 0xAB; static __shared__ variables, function statics, otherwise start a
// block on the values the previous block left, or on zeros). A kernel that reads memory
// nobody wrote and hides it arithmetically (0 * x, a masked sum) then shows it: on a GPU
// that memory may hold NaN and 0 * NaN is NaN.
static bool fill_nan() {
    static const bool nan = env_is("CUDA_EMU_FILL", "nan");
    return nan;
}
static unsigned char fill_byte(unsigned char usual) { return fill_nan() ? 0xFF : usual; }

// The kernels' static __shared__ variables: the link puts slot s's copy of every kernel
// object's .bss between __emu_static_shared_start_s and _end_s (tests/common/cuda_emu.rs
// writes the linker script, which defines all eight pairs, empty past EMU_SLOTS).
#define EMU_STATIC_SHARED(s) extern "C" char __emu_static_shared_start_##s[], __emu_static_shared_end_##s[];
EMU_STATIC_SHARED(0)
EMU_STATIC_SHARED(1)
EMU_STATIC_SHARED(2)
EMU_STATIC_SHARED(3)
EMU_STATIC_SHARED(4)
EMU_STATIC_SHARED(5)
EMU_STATIC_SHARED(6)
EMU_STATIC_SHARED(7)
static_assert(EMU_SLOTS >= 1 && EMU_SLOTS <= 8, "the linker script defines eight slots' symbols");
static void refill_static_shared(int slot) {
#if !defined(EMU_ASAN)  // (AddressSanitizer keeps redzones between those variables)
    static char* const range[8][2] = {
        {__emu_static_shared_start_0, __emu_static_shared_end_0}, {__emu_static_shared_start_1, __emu_static_shared_end_1},
        {__emu_static_shared_start_2, __emu_static_shared_end_2}, {__emu_static_shared_start_3, __emu_static_shared_end_3},
        {__emu_static_shared_start_4, __emu_static_shared_end_4}, {__emu_static_shared_start_5, __emu_static_shared_end_5},
        {__emu_static_shared_start_6, __emu_static_shared_end_6}, {__emu_static_shared_start_7, __emu_static_shared_end_7},
    };
    if (fill_nan()) memset(range[slot][0], 0xFF, range[slot][1] - range[slot][0]);
#endif
    (void)slot;
}

namespace {
// Scheduler -> thread t, and back when the thread waits or ends; sanitizers are told of
// each stack switch.
void enter(Fiber& f) {
#if defined(EMU_TSAN)
    __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(EMU_ASAN)
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack, STACK);
#endif
    emu_switch(&sched_sp, f.sp);
#if defined(EMU_ASAN)
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// In a thread: back to the scheduler (`exiting`: never to return).
void leave(Fiber& f, bool exiting) {
#if defined(EMU_TSAN)
    __tsan_switch_to_fiber(sched_tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(EMU_ASAN)
    __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake, sched_bottom, sched_size);
#endif
    emu_switch(&f.sp, sched_sp);
#if defined(EMU_ASAN)
    __sanitizer_finish_switch_fiber(f.fake, &sched_bottom, &sched_size);
#endif
    (void)exiting;
}

void yield() { leave(cur->fibers[cur_tid], false); }

// `orders_memory`: __syncthreads, which orders memory (for ThreadSanitizer, EMU_TSAN); a
// warp's shuffle exchanges registers only and orders nothing (__syncwarp would).
// `site`: for the block's barrier, the code address of the __syncthreads the thread is
// at. Threads of a block that meet at two different ones are a divergent barrier:
// undefined on a GPU (it may hang or run on past), reported by compute-sanitizer's
// synccheck; the emulator's counter would pair them up and hide it, so it stops instead.
void bar_wait(Bar& b, bool orders_memory, const void* site = nullptr) {
#if defined(EMU_TSAN)
    if (orders_memory) __tsan_release(&b);  // what this thread did before the barrier ...
#endif
    if (site) {
        if (b.arrived == 0) {
            b.site = site;
        } else if (b.site != site) {
            fprintf(stderr, "cuda_emu: in block (%u,%u,%u) thread %d waits at a different __syncthreads (code at %p) "
                    "from threads before it (at %p): a divergent barrier, undefined on a GPU\n", cur->bidx.x,
                    cur->bidx.y, cur->bidx.z, cur_tid, site, b.site);
            abort();
        }
    }
    unsigned long long g = b.gen;
    ++progress;
    if (++b.arrived == b.expected) {
        b.arrived = 0;
        ++b.gen;
    } else {
        Fiber& f = cur->fibers[cur_tid];
        f.waiting = &b;
        f.wait_gen = g;
        while (b.gen == g) yield();
        f.waiting = nullptr;
    }
#if defined(EMU_TSAN)
    if (orders_memory) __tsan_acquire(&b);  // ... comes before what every thread does after
#endif
    (void)orders_memory;
}

void bar_drop(Bar& b) {
    --b.expected;
    if (b.expected > 0 && b.arrived == b.expected) {
        b.arrived = 0;
        ++b.gen;
    }
}

// First frame of every fiber (entered by emu_switch's ret); never returns.
void fiber_entry() {
#if defined(EMU_ASAN)
    __sanitizer_finish_switch_fiber(nullptr, &sched_bottom, &sched_size);
#endif
    BlockRun* r = cur;
    int tid = cur_tid;
#if defined(EMU_TSAN)
    __tsan_acquire(&r->gate);
#endif
    r->thunk(r->params);
#if defined(EMU_TSAN)
    __tsan_release(&r->done);
#endif
    // an exited thread leaves every barrier it could still be counted in
    r->or_slots[tid] = 0;
    bar_drop(r->warp_bars[tid / 32]);
    bar_drop(r->bar);
    r->fibers[tid].done = true;
    ++progress;
    leave(r->fibers[tid], true);
    abort();  // a finished fiber is never resumed
}

void set_thread_state(const BlockRun& r, int tid) {
    cur_tid = tid;
    emu_state.bdim = r.block;
    emu_state.gdim = r.grid;
    emu_state.bid = r.bidx;
    emu_state.tid = emu_dim3{tid % r.block.x, (tid / r.block.x) % r.block.y, tid / (r.block.x * r.block.y)};
}

void run_block(BlockRun& r) {
    int n = r.nthreads;
    std::vector<Fiber>& fibers = r.fibers;
    if ((int)fibers.size() < n) fibers.resize(n);
    cur = &r;
    for (int t = 0; t < n; ++t) {
        Fiber& f = fibers[t];
        if (!f.stack) f.stack = (char*)malloc(STACK);
#if defined(EMU_TSAN)
        if (!f.tsan) f.tsan = __tsan_create_fiber(0);
#endif
        f.done = false;
        f.waiting = nullptr;
        f.async.clear();
        f.async_groups = 0;
        // a fresh stack as emu_switch leaves it: six callee-saved registers (zero) and the
        // return address fiber_entry, placed so that fiber_entry starts with rsp = 8 mod 16
        // as after a call
        uintptr_t top = ((uintptr_t)(f.stack + STACK) & ~(uintptr_t)15) - 8;
        void** sp = (void**)top;
        *--sp = (void*)&fiber_entry;
        for (int k = 0; k < 6; ++k) *--sp = nullptr;
        f.sp = sp;
    }
#if defined(EMU_TSAN)
    sched_tsan = __tsan_get_current_fiber();
    __tsan_release(&r.gate);
#endif
    int live = n;
    while (live > 0) {
        unsigned long long before = progress;
        for (int t = 0; t < n; ++t) {
            Fiber& f = fibers[t];
            if (f.done || (f.waiting && f.waiting->gen == f.wait_gen)) continue;  // still blocked
            set_thread_state(r, t);
            enter(f);
            if (f.done) --live;
        }
        if (live > 0 && progress == before) {
            fprintf(stderr, "cuda_emu: deadlock in block (%u,%u,%u): %d threads wait at barriers that cannot complete "
                    "(a __syncthreads or shuffle not reached by every live thread)\n", r.bidx.x, r.bidx.y, r.bidx.z, live);
            abort();
        }
    }
    cur = nullptr;
}
}  // namespace

extern "C" void __syncthreads() { bar_wait(cur->bar, true, __builtin_return_address(0)); }

#if defined(EMU_TSAN)
// cuda_emu.h: the ThreadSanitizer build's __threadfence and relaxed atomicAdd (this file
// is not instrumented, so TSan sees the fence object's release and acquire and not the
// atomic's access).
static char device_fence;
extern "C" void emu_threadfence() {
    __tsan_release(&device_fence);
    __tsan_acquire(&device_fence);
}
extern "C" unsigned int emu_atomic_add_relaxed(unsigned int* p, unsigned int v) {
    return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
#endif

extern "C" int __syncthreads_or(int pred) {
    const void* site = __builtin_return_address(0);
    cur->or_slots[cur_tid] = pred != 0;
    bar_wait(cur->bar, true, site);
    int any = 0;
    for (int i = 0; i < cur->nthreads; ++i) any |= cur->or_slots[i];
    bar_wait(cur->bar, true, (const char*)site + 1);  // its second barrier, a site of its own
    return any;
}

extern "C" int emu_lane() { return cur_tid & 31; }

extern "C" void emu_misaligned(const void* p, int bytes, const char* what) {
    fprintf(stderr, "cuda_emu: in block (%u,%u,%u) thread %d %s at %p, which is not %d-byte aligned: a GPU "
            "faults (misaligned address)\n", cur->bidx.x, cur->bidx.y, cur->bidx.z, cur_tid, what, p, bytes);
    abort();
}

extern "C" uint64_t emu_shfl64(uint64_t v, int src_lane) {
    int warp = cur_tid / 32;
    Bar& b = cur->warp_bars[warp];
    // every lane of this shuffle sees the same generation before the barrier; + 1 keeps 0
    // for "never"
    const unsigned long long round = b.gen + 1;
    cur->shfl[cur_tid] = v;
    cur->shfl_round[cur_tid] = round;
    bar_wait(b, false);
    const int src = warp * 32 + src_lane;
    if (cur->shfl_round[src] != round) {
        // CUDA Programming Guide, Warp Shuffle Functions: "If the target thread is inactive,
        // the retrieved value is undefined."
        fprintf(stderr, "cuda_emu: in block (%u,%u,%u) thread %d shuffles from lane %d, which %s: on a GPU "
                "that value is undefined\n", cur->bidx.x, cur->bidx.y, cur->bidx.z, cur_tid, src_lane,
                src < cur->nthreads ? "has exited (or is not at this shuffle)" : "is past the block's last thread");
        abort();
    }
    uint64_t r = cur->shfl[src];
    bar_wait(b, false);
    return r;
}

extern "C" void emu_warp_gather(const void* mine, int bytes, void* all) {
    int warp = cur_tid / 32;
    memcpy(&cur->gather[(size_t)cur_tid * 64], mine, (size_t)bytes);
    bar_wait(cur->warp_bars[warp], false);
    memcpy(all, &cur->gather[(size_t)warp * 32 * 64], 32 * 64);
    bar_wait(cur->warp_bars[warp], false);
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 (kernels/mma.cuh): every lane passes
// its row address; all rows are read between the warp's two barriers, so no lane's later
// store can reach them, as the instruction reads them at once on a GPU.
extern "C" void emu_ldmatrix(unsigned* out, int trans, const void* row) {
    if ((uintptr_t)row % 16) emu_misaligned(row, 16, "ldmatrix (a row address)");
    int warp = cur_tid / 32, lane = cur_tid & 31;
    memcpy(&cur->gather[(size_t)cur_tid * 64], &row, sizeof row);
    bar_wait(cur->warp_bars[warp], false);
    for (int i = 0; i < 4; ++i) {
        unsigned short v[2];
        for (int h = 0; h < 2; ++h) {
            // the stored matrix's (row, column) this lane's half h holds
            const int mr = trans ? 2 * (lane & 3) + h : lane >> 2, mc = trans ? lane >> 2 : 2 * (lane & 3) + h;
            const unsigned short* p;
            memcpy(&p, &cur->gather[(size_t)(warp * 32 + 8 * i + mr) * 64], sizeof p);
            v[h] = p[mc];
        }
        out[i] = (unsigned)v[0] | ((unsigned)v[1] << 16);
    }
    bar_wait(cur->warp_bars[warp], false);
}

// cp.async (kernels/mma.cuh): the copy is only recorded, and made when the issuing thread's
// cp_async_wait lets its group land, so a kernel that reads the destination before its
// wait and barrier reads what was there before (NaN under CUDA_EMU_FILL=nan) and fails its
// parity test, where an immediate copy would hide the missing wait.
extern "C" void emu_cp_async(void* dst, const void* src, int bytes) {
    if ((uintptr_t)dst % (uintptr_t)bytes) emu_misaligned(dst, bytes, "cp.async (its shared destination)");
    if ((uintptr_t)src % (uintptr_t)bytes) emu_misaligned(src, bytes, "cp.async (its global source)");
    cur->fibers[cur_tid].async.push_back({dst, src, bytes, -1});
}
extern "C" void emu_cp_async_commit() {
    Fiber& f = cur->fibers[cur_tid];
    for (auto& c : f.async)
        if (c.group < 0) c.group = f.async_groups;
    ++f.async_groups;
}
extern "C" void emu_cp_async_wait(int newest_pending) {
    Fiber& f = cur->fibers[cur_tid];
    std::vector<Fiber::AsyncCopy> left;
    for (auto& c : f.async) {
        if (c.group >= 0 && c.group < f.async_groups - newest_pending)
            memcpy(c.dst, c.src, (size_t)c.bytes);
        else
            left.push_back(c);
    }
    f.async.swap(left);
}

extern "C" void* emu_dyn_smem() { return cur->smem.empty() ? nullptr : cur->smem.data(); }

// CUDA_EMU_PROFILE=1: the emulator's own time per kernel (its launches, blocks and wall
// seconds), printed at exit, most first: where a slow emulated test spends it (a kernel
// with many barriers under ThreadSanitizer, ...), which perf cannot attribute across
// the fibers' stacks.
struct KernelTime {
    unsigned long long launches = 0, blocks = 0;
    double seconds = 0;
};
static std::map<std::string, KernelTime>& kernel_times() {
    static auto* m = new std::map<std::string, KernelTime>;  // never destroyed: read at exit
    return *m;
}
static void print_kernel_times() {
    std::vector<std::pair<double, std::string>> rows;
    double total = 0;
    for (auto& [name, t] : kernel_times()) {
        char line[256];
        snprintf(line, sizeof line, "%9.3f s %8llu launches %10llu blocks  %s", t.seconds, t.launches, t.blocks,
                 name.c_str());
        rows.emplace_back(t.seconds, line);
        total += t.seconds;
    }
    std::sort(rows.rbegin(), rows.rend());
    fprintf(stderr, "cuda_emu profile: %.3f s in kernels\n", total);
    for (auto& [_, line] : rows) fprintf(stderr, "cuda_emu profile: %s\n", line.c_str());
}
static bool profiling() {
    static const bool on = [] {
        const bool set = env_is("CUDA_EMU_PROFILE", "1");
        if (set) atexit(print_kernel_times);
        return set;
    }();
    return on;
}

static void run_blocks(const EmuKernel* k, void** params, emu_dim3 grid, emu_dim3 block, size_t smem);
static void launch(const EmuKernel* k, void** params, emu_dim3 grid, emu_dim3 block, size_t smem) {
    static std::mutex one_launch_at_a_time;
    std::lock_guard<std::mutex> lock(one_launch_at_a_time);
    if (!profiling()) {
        run_blocks(k, params, grid, block, smem);
        return;
    }
    const auto t0 = std::chrono::steady_clock::now();
    run_blocks(k, params, grid, block, smem);
    KernelTime& t = kernel_times()[k->name];
    ++t.launches;
    t.blocks += (unsigned long long)grid.x * grid.y * grid.z;
    t.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// launch's blocks, one after another (the caller holds the launch lock)
static void run_blocks(const EmuKernel* k, void** params, emu_dim3 grid, emu_dim3 block, size_t smem) {
    int n = (int)(block.x * block.y * block.z);
    EmuThreadState saved = emu_state;
    // A GPU runs blocks in no promised order. The emulator runs them one at a time, in
    // launch order (x fastest), or (CUDA_EMU_BLOCK_ORDER=reverse) last block first, so a
    // kernel that depends on the order (a "last block" that assumes which one it is) shows
    // in parity; or (=y-first) y fastest, which the ThreadSanitizer child uses: the blocks
    // of one column of a (columns, row chunks) grid, which meet in common.cuh's
    // last_block_of_column, then run next to each other, inside its window of unordered
    // blocks (see "Slots").
    enum Order { X_FIRST, REVERSE, Y_FIRST };
    static const Order order = [] {
        const char* v = getenv("CUDA_EMU_BLOCK_ORDER");
        if (v && strcmp(v, "reverse") == 0) return REVERSE;
        if (v && strcmp(v, "y-first") == 0) return Y_FIRST;
        return X_FIRST;
    }();
    const unsigned long long total = (unsigned long long)grid.x * grid.y * grid.z;
    for (unsigned long long q = 0; q < total; ++q) {
        const unsigned long long o = order == REVERSE ? total - 1 - q : q;
        unsigned bx = (unsigned)(o % grid.x), by = (unsigned)(o / grid.x % grid.y);
        if (order == Y_FIRST) {
            by = (unsigned)(o % grid.y);
            bx = (unsigned)(o / grid.y % grid.x);
        }
        const unsigned bz = (unsigned)(o / ((unsigned long long)grid.x * grid.y));
        const int slot = (int)(q % EMU_SLOTS);
        BlockRun& r = slots[slot];
#if defined(EMU_TSAN)
        // the slot's previous block is over before its memory is refilled and reused
        __tsan_acquire(&r.done);
#endif
        r.thunk = k->slot[slot];
        r.params = params;
        r.grid = grid;
        r.block = block;
        r.bidx = emu_dim3{bx, by, bz};
        r.nthreads = n;
        r.bar = Bar{};
        r.bar.expected = n;
        r.warp_bars.clear();
        for (int w = 0; w * 32 < n; ++w) {
            Bar b;
            b.expected = std::min(32, n - w * 32);
            r.warp_bars.push_back(b);
        }
        r.shfl.assign(((n + 31) / 32) * 32, 0);
        r.shfl_round.assign(((n + 31) / 32) * 32, 0);
        r.gather.assign(((n + 31) / 32) * 32 * 64, 0);
        r.or_slots.assign(n, 0);
        // 0xAB: uninitialised shared memory is garbage, not zeros, as on a GPU. A fresh
        // vector each block, so AddressSanitizer's redzone starts where the launch's size ends.
        r.smem = std::vector<char>(smem + (EMU_EXACT_SIZES ? 0 : 16), (char)fill_byte(0xAB));
        refill_static_shared(slot);
        run_block(r);
    }
#if defined(EMU_TSAN)
    // stream order: the next launch, and the host after this one, come after every block
    for (BlockRun& r : slots) __tsan_acquire(&r.done);
#endif
    emu_state = saved;
}

// ---- the driver API -------------------------------------------------------------------------------
typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUevent;
typedef void* CUmodule;
typedef void* CUfunction;

enum {
    OK = 0,
    ERR_INVALID_VALUE = 1,
    ERR_OUT_OF_MEMORY = 2,
    ERR_NOT_FOUND = 500,
    ERR_INVALID_DEVICE = 101,
    ERR_INVALID_CONTEXT = 201,
    ERR_NOT_SUPPORTED = 801,
    ERR_LAUNCH_OUT_OF_RESOURCES = 701
};

// ---- what a GPU would refuse to launch ----------------------------------------------------------
// The emulator runs any block size, but a GPU refuses a launch whose block needs more
// registers than an SM has for one block (CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES) or more shared
// memory than it may have. Both depend on what ptxas made of each kernel, which build.rs
// writes to its report (target/<profile>/kernel-report.txt): with CUDA_EMU_KERNEL_REPORT
// naming that file, every launch is held to sm_80's and sm_90's numbers for its kernel, so a
// kernel grown past its launch's block size fails here, not first on a lent GPU.
struct Resources {
    std::string target;
    int regs, static_smem;
};
static std::mutex resources_mu;
// kernel name -> its ptxas numbers per target; null when no report was named
static std::map<std::string, std::vector<Resources>>* kernel_resources() {
    static std::map<std::string, std::vector<Resources>>* table = [] {
        const char* path = getenv("CUDA_EMU_KERNEL_REPORT");
        if (!path || !*path) return (std::map<std::string, std::vector<Resources>>*)nullptr;
        FILE* f = fopen(path, "r");
        if (!f) {
            fprintf(stderr, "cuda_emu: CUDA_EMU_KERNEL_REPORT %s cannot be read\n", path);
            abort();
        }
        auto* t = new std::map<std::string, std::vector<Resources>>;
        char line[512];
        // "name target regs smem stack spill-stores spill-loads [SPILLS]"
        while (fgets(line, sizeof line, f)) {
            char name[256], target[32];
            int regs, smem, stack, st, ld;
            if (sscanf(line, "%255s %31s %d %d %d %d %d", name, target, &regs, &smem, &stack, &st, &ld) == 7 &&
                strncmp(target, "sm_", 3) == 0)
                (*t)[name].push_back(Resources{target, regs, smem});
        }
        fclose(f);
        if (t->empty()) {
            fprintf(stderr, "cuda_emu: CUDA_EMU_KERNEL_REPORT %s lists no kernel\n", path);
            abort();
        }
        fprintf(stderr, "cuda_emu: launches held to the registers and shared memory of %zu kernels in %s\n",
                t->size(), path);
        return t;
    }();
    return table;
}
// kernels launched that the report does not list but a GPU build would (printed at exit; the
// emulator's parity run asserts there are none): planted.cu's are the emulator's own
static std::set<std::string>& unlisted() {
    static auto* s = new std::set<std::string>;
    return *s;
}
static void print_unlisted() {
    std::string names;
    for (auto& n : unlisted())
        if (n.rfind("planted_", 0) != 0) names += (names.empty() ? "" : ", ") + n;
    if (!names.empty()) fprintf(stderr, "cuda_emu: kernels launched without a ptxas report entry: %s\n", names.c_str());
}
// A kernel's ptxas numbers on the emulated device (sm_90), or null if not listed.
static const Resources* sm90(const std::string& name) {
    auto* t = kernel_resources();
    if (!t) return nullptr;
    auto it = t->find(name);
    if (it == t->end()) return nullptr;
    for (auto& r : it->second)
        if (r.target == "sm_90") return &r;
    return nullptr;
}
static int static_smem(const std::string& name) {
    const Resources* r = sm90(name);
    return r ? r->static_smem : 0;
}
// Registers a warp takes at `regs` a thread: allocated in units of 256 (sm_80 and sm_90), of
// 64 Ki a block at most.
static unsigned regs_per_warp(int regs) { return ((unsigned)regs * 32 + 255) / 256 * 256; }
// The reason the hardware would refuse this launch, or "" if it would run it.
static std::string launch_refusal(const std::string& name, unsigned threads, unsigned dyn_smem) {
    auto* t = kernel_resources();
    if (!t) return "";
    auto it = t->find(name);
    if (it == t->end()) {
        std::lock_guard<std::mutex> g(resources_mu);
        if (unlisted().empty()) atexit(print_unlisted);
        unlisted().insert(name);
        return "";
    }
    const unsigned warps = (threads + 31) / 32;
    for (auto& r : it->second) {
        const unsigned per_warp = regs_per_warp(r.regs);
        if (warps * per_warp > 65536) {
            char msg[256];
            snprintf(msg, sizeof msg,
                     "%s on %s uses %d registers a thread: a block of %u threads needs %u of the 65536 an SM has "
                     "for one block",
                     name.c_str(), r.target.c_str(), r.regs, threads, warps * per_warp);
            return msg;
        }
        if (r.target == "sm_90" && (unsigned)r.static_smem + dyn_smem > 227 * 1024) {
            char msg[256];
            snprintf(msg, sizeof msg, "%s on sm_90: %d bytes of static and %u of dynamic shared memory exceed 227 KiB",
                     name.c_str(), r.static_smem, dyn_smem);
            return msg;
        }
    }
    return "";
}

static int dummy_ctx, dummy_stream, dummy_module;

// What the engine asked of the driver, for tests that hold a step to "no allocation, a
// bounded number of synchronisations" (tests/gpu_parity.rs): read with emu_stats.
enum { ST_ALLOC, ST_FREE, ST_HTOD, ST_DTOH, ST_SYNC, ST_LAUNCH, ST_COUNT };
static unsigned long long stats[ST_COUNT];
// CUDA_EMU_NO_WORK=1: launches and GEMMs are checked and counted but not executed, so a
// command's time is the host's own cost of enqueueing its work (the engine, cudarc, and
// this library's bookkeeping, no driver): the measurement behind BENCHMARKS.md's "host
// cost of a step". Results are meaningless in this mode (device memory starts zeroed and
// untouched, so shapes beyond this host's memory can have their launches checked:
// tests/gpu_cli.rs bench_launches_are_valid_at_the_largest_shapes); at exit it prints the
// counters.
static unsigned long long device_ops;  // async memsets and device-to-device copies
// per kernel, in no-work mode: launches, the fewest and most blocks of one, threads a block
// (of the last launch). A launch of fewer blocks than the GPU has SMs, or one whose blocks
// mostly return at once, shows here without a GPU. Never destroyed, as print_counters
// reads it at exit.
struct LaunchCount {
    unsigned long long n = 0, min_blocks = ~0ull, max_blocks = 0;
    unsigned threads = 0;
};
static std::map<const EmuKernel*, LaunchCount>& launches_of() {
    static auto* m = new std::map<const EmuKernel*, LaunchCount>;
    return *m;
}
static void print_counters() {
    std::vector<std::pair<unsigned long long, std::string>> per;
    for (auto& [k, c] : launches_of()) {
        char shape[96];
        snprintf(shape, sizeof shape, " (blocks %llu..%llu of %u threads)", c.min_blocks, c.max_blocks, c.threads);
        per.emplace_back(c.n, k->name + shape);
    }
    std::sort(per.rbegin(), per.rend());
    for (auto& [n, name] : per) fprintf(stderr, "cuda_emu launches of %s: %llu\n", name.c_str(), n);
    fprintf(stderr,
            "cuda_emu counters: launches %llu, memsets and device copies %llu, uploads %llu, downloads %llu, "
            "syncs %llu, allocs %llu\n",
            stats[ST_LAUNCH], device_ops, stats[ST_HTOD], stats[ST_DTOH], stats[ST_SYNC], stats[ST_ALLOC]);
}
static int emu_no_work() {
    static const int on = [] {
        const char* v = getenv("CUDA_EMU_NO_WORK");
        bool set = v && *v && strcmp(v, "0") != 0;
        if (set) atexit(print_counters);
        return set ? 1 : 0;
    }();
    return on;
}
extern "C" void emu_stats(unsigned long long* out) {
    for (int i = 0; i < ST_COUNT; ++i) out[i] = stats[i];
}

// cuMemHostAlloc's blocks: start -> length.
static std::mutex pinned_mu;
static std::map<char*, size_t> pinned;
static bool is_pinned(void* d, size_t n) {
    std::lock_guard<std::mutex> g(pinned_mu);
    auto it = pinned.upper_bound((char*)d);
    if (it == pinned.begin()) return false;
    --it;
    return (char*)d + n <= it->first + it->second;
}

// ---- Deferred work ------------------------------------------------------------------------------
// A GPU runs a stream's work after the call that enqueued it returns, so a host that reads
// what a copy brings back before waiting for it, or rewrites page-locked memory an
// enqueued copy has yet to read, or frees what a kernel has yet to use, gets whatever
// the timing gives it. Run at once, as the emulator first did, every such bug passes. So
// by default stream work (launches, async copies and memsets, cuBLAS calls, async frees)
// is queued, in the one order of the emulator's one stream, and runs only when the host
// waits: a stream or context synchronisation, a stream query or a synchronous call (a copy
// to or from pageable memory, a plain cuMemFree) runs all of it; an event's
// synchronisation or query runs the work enqueued before the event was last recorded, and
// no more. That is the latest a GPU could run it, so any missing wait, or a wait for the
// wrong event, shows in the numbers. What the call reads from the host is read when it is made where CUDA does so
// (a launch's arguments; an upload from pageable memory, which the driver stages) and
// when the queue runs where the GPU's DMA does (page-locked memory).
// CUDA_EMU_DEFER=0 runs everything at once instead; no-work mode never queues.
static bool deferring() {
    static const bool on = !emu_no_work() && !env_is("CUDA_EMU_DEFER", "0");
    return on;
}
static std::mutex queue_mu;
// (sequence number, work), numbered from 1 in enqueue order
static std::deque<std::pair<unsigned long long, std::function<void()>>> queued;
static unsigned long long enqueued_seq;  // the last number given out
// Runs `op` now, or queues it (deferring()).
static void enqueue(std::function<void()> op) {
    if (!deferring()) return op();
    std::lock_guard<std::mutex> g(queue_mu);
    queued.emplace_back(++enqueued_seq, std::move(op));
}
// Runs the queued work numbered up to `last`, in order.
static void drain_to(unsigned long long last) {
    for (;;) {
        std::function<void()> op;
        {
            std::lock_guard<std::mutex> g(queue_mu);
            if (queued.empty() || queued.front().first > last) return;
            op = std::move(queued.front().second);
            queued.pop_front();
        }
        op();
    }
}
// Runs everything queued (what a wait for the stream sees done).
static void drain() { drain_to(~0ull); }
// Events: each the sequence number of the last work enqueued before it was last recorded
// (0: never recorded, nothing to wait for).
static std::map<void*, unsigned long long> event_seq;
static unsigned long long recorded_at(void* e) {
    std::lock_guard<std::mutex> g(queue_mu);
    auto it = event_seq.find(e);
    return it == event_seq.end() ? 0 : it->second;
}
// cublas.cpp's GEMMs join the same queue: 1 = queued (`run(ctx)` later, which owns ctx),
// 0 = the caller runs it now.
extern "C" int emu_defer(void (*run)(void*), void* ctx) {
    if (!deferring()) return 0;
    enqueue([run, ctx] { run(ctx); });
    return 1;
}

// ---- Contexts ----------------------------------------------------------------------------------
// As in the driver, each host thread has its own stack of current contexts (cuCtxSetCurrent
// replaces the top, Push / Pop move it), empty on a new thread, and a call that works in a
// context fails with CUDA_ERROR_INVALID_CONTEXT on a thread where none is current: a
// backend used from a thread other than the one that opened it must bind the context
// there first (cudarc's safe calls do; raw driver calls do not). Retaining the primary
// context makes nothing current. (cuBLAS is a runtime-API library: the runtime makes the
// device's primary context current on a thread that has none, so cublas.cpp checks nothing.)
static thread_local std::vector<CUcontext> ctx_stack;
static CUresult need_ctx(const char* fn) {
    if (!ctx_stack.empty() && ctx_stack.back()) return OK;
    fprintf(stderr, "cuda_emu: %s on a thread with no current context: CUDA_ERROR_INVALID_CONTEXT\n", fn);
    return ERR_INVALID_CONTEXT;
}
#define NEED_CTX()                                  \
    do {                                            \
        if (CUresult r_ = need_ctx(__func__)) return r_; \
    } while (0)

// The emulator's hand-written fp16 decode (include/cuda_fp16.h emu_half_bits_to_float)
// against the compiler's _Float16 widening, every one of the 65536 patterns, bit for bit
// (NaN: a NaN with the same sign); checked once, when the backend first calls the driver.
static void check_half_decode() {
    for (unsigned u = 0; u < 0x10000u; ++u) {
        _Float16 h;
        const unsigned short bits16 = (unsigned short)u;
        memcpy(&h, &bits16, 2);
        const float want = (float)h, got = emu_half_bits_to_float(bits16);
        uint32_t w, g;
        memcpy(&w, &want, 4);
        memcpy(&g, &got, 4);
        const bool same = want != want ? (got != got && (w >> 31) == (g >> 31)) : w == g;
        if (!same) {
            fprintf(stderr, "cuda_emu: fp16 0x%04x decodes to 0x%08x, _Float16 gives 0x%08x\n", u, g, w);
            abort();
        }
    }
}

extern "C" {
CUresult cuInit(unsigned int) {
    static const bool checked = (check_half_decode(), true);
    (void)checked;
    return OK;
}
// CUDA 12.9 unless CUDA_EMU_DRIVER_VERSION says otherwise (13000: a CUDA 13 driver), for the
// tests of which cuBLAS the CLI accepts under which driver (tests/gpu_cli.rs).
CUresult cuDriverGetVersion(int* v) {
    const char* e = getenv("CUDA_EMU_DRIVER_VERSION");
    *v = e ? atoi(e) : 12090;
    return OK;
}
CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return OK;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return ERR_INVALID_DEVICE;
    *d = 0;
    return OK;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    snprintf(name, len, "CPU emulator of a CUDA device (tests/cuda_emu, sm_90)");
    return OK;
}
CUresult cuDeviceTotalMem_v2(size_t* b, CUdevice) {
    *b = (size_t)64 << 30;
    return OK;
}
// Whether the device says it has memory pools. A data-centre GPU does, and then cudarc
// allocates with cuMemAllocAsync and frees with cuMemFreeAsync, in stream order, with no
// wait; without pools (some virtual GPUs) it allocates with cuMemAlloc and, before each
// cuMemFree, synchronises the stream, which runs all queued work and so hides a host that
// forgot to wait. The default is the GPU's path; CUDA_EMU_MEMORY_POOLS=0 takes the other.
static int memory_pools() {
    static const int on = env_is("CUDA_EMU_MEMORY_POOLS", "0") ? 0 : 1;
    return on;
}
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
        case 75: *v = 9; break;                       // compute capability major
        case 76: *v = 0; break;                       // minor
        case 1: *v = MAX_THREADS; break;              // max threads per block
        case 2: case 3: *v = MAX_THREADS; break;      // max block dim x, y
        case 4: *v = 64; break;                       // max block dim z
        case 5: *v = 2147483647; break;               // max grid dim x
        case 6: case 7: *v = 65535; break;            // max grid dim y, z
        case 8: *v = 48 * 1024; break;                // shared memory per block
        case 97: *v = 227 * 1024; break;              // opt-in shared memory per block
        case 16: *v = 132; break;                     // multiprocessors
        case 10: *v = 32; break;                      // warp size
        case 115: *v = memory_pools(); break;         // memory pools (stream-ordered allocation)
        default: *v = 0;
    }
    return OK;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
    *c = &dummy_ctx;
    return OK;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) {
    drain();
    return OK;
}
CUresult cuCtxSetCurrent(CUcontext c) {
    if (ctx_stack.empty()) ctx_stack.push_back(c);
    else ctx_stack.back() = c;
    return OK;
}
CUresult cuCtxGetCurrent(CUcontext* c) {
    *c = ctx_stack.empty() ? nullptr : ctx_stack.back();
    return OK;
}
CUresult cuCtxPushCurrent_v2(CUcontext c) {
    ctx_stack.push_back(c);
    return OK;
}
CUresult cuCtxPopCurrent_v2(CUcontext* c) {
    if (ctx_stack.empty()) return ERR_INVALID_CONTEXT;
    if (c) *c = ctx_stack.back();
    ctx_stack.pop_back();
    return OK;
}
CUresult cuCtxGetDevice(CUdevice* d) {
    NEED_CTX();
    *d = 0;
    return OK;
}
CUresult cuCtxSynchronize() {
    NEED_CTX();
    ++stats[ST_SYNC];
    drain();
    return OK;
}
CUresult cuStreamCreate(CUstream* s, unsigned int) {
    NEED_CTX();
    *s = &dummy_stream;
    return OK;
}
CUresult cuStreamCreateWithPriority(CUstream* s, unsigned int, int) {
    NEED_CTX();
    *s = &dummy_stream;
    return OK;
}
CUresult cuStreamDestroy_v2(CUstream) {
    NEED_CTX();
    return OK;
}
CUresult cuStreamSynchronize(CUstream) {
    NEED_CTX();
    ++stats[ST_SYNC];
    drain();
    return OK;
}
// "complete" after running the queue: a host that polls sees its work done
CUresult cuStreamQuery(CUstream) {
    NEED_CTX();
    drain();
    return OK;
}
CUresult cuStreamWaitEvent(CUstream, CUevent, unsigned int) {
    NEED_CTX();
    return OK;
}
// each event its own object, so a wait for one is told from a wait for another
CUresult cuEventCreate(CUevent* e, unsigned int) {
    NEED_CTX();
    *e = new char;
    std::lock_guard<std::mutex> g(queue_mu);
    event_seq[*e] = 0;
    return OK;
}
CUresult cuEventRecord(CUevent e, CUstream) {
    NEED_CTX();
    std::lock_guard<std::mutex> g(queue_mu);
    event_seq[e] = enqueued_seq;
    return OK;
}
CUresult cuEventRecordWithFlags(CUevent e, CUstream s, unsigned int) { return cuEventRecord(e, s); }
CUresult cuEventSynchronize(CUevent e) {
    NEED_CTX();
    ++stats[ST_SYNC];
    drain_to(recorded_at(e));  // the work before the event, not the work after it
    return OK;
}
// "complete" after running the work before the event: a host that polls sees it done
CUresult cuEventQuery(CUevent e) {
    NEED_CTX();
    drain_to(recorded_at(e));
    return OK;
}
CUresult cuEventDestroy_v2(CUevent e) {
    NEED_CTX();
    {
        std::lock_guard<std::mutex> g(queue_mu);
        event_seq.erase(e);
    }
    delete (char*)e;
    return OK;
}
CUresult cuEventElapsedTime(float* ms, CUevent, CUevent) {
    NEED_CTX();
    *ms = 0.0f;
    return OK;
}

static CUresult alloc(CUdeviceptr* p, size_t n) {
    ++stats[ST_ALLOC];
    if (emu_no_work()) {
        // No-work mode: zeroed memory the host never touches (calloc takes large blocks
        // fresh from the kernel without writing them), so a model too large for this host's
        // memory can still have its launches checked, and what is read back is finite.
        // 256-aligned inside the block, the block's own address just before.
        char* raw = (char*)calloc(1, n + 8 + 256);
        if (!raw) return ERR_OUT_OF_MEMORY;
        char* m = (char*)(((uintptr_t)raw + 8 + 255) & ~(uintptr_t)255);
        ((char**)m)[-1] = raw;
        *p = (CUdeviceptr)m;
        return OK;
    }
    // (EMU_ASAN: exactly n bytes, so ASan's redzone starts where the buffer ends)
    void* m = nullptr;
    if (posix_memalign(&m, 256, EMU_EXACT_SIZES ? (n ? n : 1) : ((n + 255) / 256) * 256 + 256)) return ERR_OUT_OF_MEMORY;
    memset(m, fill_byte(0xCD), n);  // fresh device memory is garbage, not zeros
    *p = (CUdeviceptr)m;
    return OK;
}
static void release(CUdeviceptr p) {
    ++stats[ST_FREE];
    if (emu_no_work() && p) free(((char**)p)[-1]);
    else free((void*)p);
}
// Says once per process which allocator the engine (cudarc) took, for the tests to check.
static void say_once(std::atomic<bool>& said, const char* what) {
    if (!said.exchange(true)) fprintf(stderr, "cuda_emu: %s\n", what);
}
static std::atomic<bool> said_sync, said_pool, said_refused, said_host_refused;
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    NEED_CTX();
    say_once(said_sync, "allocations by cuMemAlloc (plain, freed after a synchronisation)");
    return alloc(p, n);
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, CUstream) {
    NEED_CTX();
    // CUDA_EMU_ASYNC_ALLOC=fail: a device that lists memory pools but whose stream-ordered
    // allocation fails (CUDA_ERROR_NOT_SUPPORTED), as under a GPU proxy that lacks it
    static const bool refuse = env_is("CUDA_EMU_ASYNC_ALLOC", "fail");
    if (refuse) {
        say_once(said_refused, "cuMemAllocAsync refused (CUDA_EMU_ASYNC_ALLOC=fail)");
        return ERR_NOT_SUPPORTED;
    }
    say_once(said_pool, "allocations by cuMemAllocAsync (memory pools, stream order)");
    return alloc(p, n);
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    NEED_CTX();
    drain();  // synchronous: the work queued before may still use p
    release(p);
    return OK;
}
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) {
    NEED_CTX();
    // Where stream-ordered allocation is refused, no block came from it: a stream-ordered
    // free then means the engine freed a cuMemAlloc block the way cudarc frees its own.
    if (env_is("CUDA_EMU_ASYNC_ALLOC", "fail")) {
        fprintf(stderr, "cuda_emu: cuMemFreeAsync(%p) on a device whose stream-ordered allocation is refused "
                        "(CUDA_EMU_ASYNC_ALLOC=fail): the block came from cuMemAlloc\n", (void*)p);
        abort();
    }
    enqueue([p] { release(p); });
    return OK;
}
CUresult cuMemsetD8_v2(CUdeviceptr p, unsigned char v, size_t n) {
    NEED_CTX();
    drain();
    memset((void*)p, v, n);
    return OK;
}
CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, CUstream) {
    NEED_CTX();
    ++device_ops;
    if (!emu_no_work()) enqueue([=] { memset((void*)p, v, n); });
    return OK;
}
CUresult cuMemsetD32Async(CUdeviceptr p, unsigned int v, size_t n, CUstream) {
    NEED_CTX();
    ++device_ops;
    if (!emu_no_work())
        enqueue([=] {
            for (size_t i = 0; i < n; ++i) ((unsigned int*)p)[i] = v;
        });
    return OK;
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* s, size_t n) {
    NEED_CTX();
    ++stats[ST_HTOD];
    ++stats[ST_SYNC];  // "a stream sync is performed before the copy is initiated"
    drain();
    memcpy((void*)d, s, n);
    return OK;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* s, size_t n, CUstream) {
    NEED_CTX();
    ++stats[ST_HTOD];
    if (is_pinned((void*)s, n)) {
        // a DMA that reads the host memory when the stream gets to it
        if (!emu_no_work()) enqueue([=] { memcpy((void*)d, s, n); });
        return OK;
    }
    // from pageable memory "the driver may synchronize with the stream" to stage it:
    // counted as the synchronisation it may be; the bytes are taken now (the staging)
    ++stats[ST_SYNC];
    auto staged = std::make_shared<std::vector<char>>((const char*)s, (const char*)s + n);
    enqueue([=] { memcpy((void*)d, staged->data(), n); });
    return OK;
}
CUresult cuMemcpyDtoH_v2(void* d, CUdeviceptr s, size_t n) {
    NEED_CTX();
    ++stats[ST_DTOH];
    ++stats[ST_SYNC];  // waits for the stream, then the copy
    drain();
    memcpy(d, (const void*)s, n);
    return OK;
}
CUresult cuMemcpyDtoHAsync_v2(void* d, CUdeviceptr s, size_t n, CUstream) {
    NEED_CTX();
    ++stats[ST_DTOH];
    if (is_pinned(d, n)) {
        // lands in the host memory when the stream gets to it: the host must wait to read it
        if (!emu_no_work()) enqueue([=] { memcpy(d, (const void*)s, n); });
        return OK;
    }
    // into pageable memory a real driver returns only once the copy has landed, that is
    // after the work before it: a synchronisation, which a step must not have
    ++stats[ST_SYNC];
    drain();
    memcpy(d, (const void*)s, n);
    return OK;
}
// page-locked host memory: the emulator only remembers where it is (for the rule above),
// and counts the calls (emu_host_allocs: each is a driver call that locks pages on a GPU)
static std::atomic<unsigned long long> host_allocs{0};
extern "C" unsigned long long emu_host_allocs() { return host_allocs.load(); }
CUresult cuMemHostAlloc(void** p, size_t n, unsigned int) {
    NEED_CTX();
    ++host_allocs;
    // CUDA_EMU_HOST_ALLOC=fail: no page-locked memory to be had (CUDA_ERROR_NOT_SUPPORTED)
    static const bool refuse = env_is("CUDA_EMU_HOST_ALLOC", "fail");
    if (refuse) {
        say_once(said_host_refused, "cuMemHostAlloc refused (CUDA_EMU_HOST_ALLOC=fail)");
        return ERR_NOT_SUPPORTED;
    }
    // zeroed in no-work mode, where copies into it are skipped: what the host reads back
    // there is then zeros, never stale bytes a numeric check would stop on
    *p = emu_no_work() ? calloc(1, n ? n : 1) : malloc(n ? n : 1);
    if (!*p) return ERR_OUT_OF_MEMORY;
    std::lock_guard<std::mutex> g(pinned_mu);
    pinned[(char*)*p] = n;
    return OK;
}
CUresult cuMemFreeHost(void* p) {
    NEED_CTX();
    drain();  // lenient: copies still queued from or into p run first
    {
        std::lock_guard<std::mutex> g(pinned_mu);
        pinned.erase((char*)p);
    }
    free(p);
    return OK;
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) {
    NEED_CTX();
    drain();
    memmove((void*)d, (const void*)s, n);
    return OK;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, CUstream) {
    NEED_CTX();
    ++device_ops;
    if (!emu_no_work()) enqueue([=] { memmove((void*)d, (const void*)s, n); });
    return OK;
}
CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    NEED_CTX();
    *free_b = (size_t)60 << 30;
    *total = (size_t)64 << 30;
    return OK;
}
CUresult cuModuleLoadData(CUmodule* m, const void*) {
    NEED_CTX();
    *m = &dummy_module;
    return OK;
}
CUresult cuModuleUnload(CUmodule) {
    NEED_CTX();
    return OK;
}
CUresult cuModuleGetFunction(CUfunction* f, CUmodule, const char* name) {
    NEED_CTX();
    auto it = registry().find(name);
    if (it == registry().end()) {
        fprintf(stderr, "cuda_emu: no kernel named %s was compiled\n", name);
        return ERR_NOT_FOUND;
    }
    for (int s = 0; s < EMU_SLOTS; ++s)
        if (!it->second.slot[s]) {
            fprintf(stderr, "cuda_emu: kernel %s has no copy for slot %d\n", name, s);
            return ERR_NOT_FOUND;
        }
    *f = (CUfunction)&it->second;
    return OK;
}
// As on a GPU, a launch may ask for more than 48 KiB of dynamic shared memory only after
// CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (8) was raised for that kernel.
static std::map<CUfunction, int>& dyn_smem_limit() {
    static std::map<CUfunction, int> m;
    return m;
}
static std::mutex dyn_smem_mutex;
CUresult cuFuncSetAttribute(CUfunction f, int attr, int v) {
    NEED_CTX();
    if (attr == 8) {
        // as on a GPU, the opt-in covers what static shared memory leaves of 227 KiB
        if (v < 0 || v > 227 * 1024 - static_smem(((const EmuKernel*)f)->name)) return ERR_INVALID_VALUE;
        std::lock_guard<std::mutex> lock(dyn_smem_mutex);
        dyn_smem_limit()[f] = v;
    }
    return OK;
}
// What a GPU answers from the loaded image (sm_90's numbers in ptxas' report, when named):
// max threads a block (0), static shared memory (1), registers a thread (4), the dynamic
// shared memory opt-in (8).
CUresult cuFuncGetAttribute(int* v, int attr, CUfunction f) {
    NEED_CTX();
    const std::string& name = ((const EmuKernel*)f)->name;
    const Resources* res = sm90(name);
    const int regs = res ? res->regs : 0;
    switch (attr) {
        case 0: *v = regs ? std::min(MAX_THREADS, (int)(65536 / regs_per_warp(regs)) * 32) : MAX_THREADS; break;
        case 1: *v = static_smem(name); break;
        case 4: *v = regs; break;
        case 8: {
            std::lock_guard<std::mutex> lock(dyn_smem_mutex);
            auto it = dyn_smem_limit().find(f);
            *v = it == dyn_smem_limit().end() ? 48 * 1024 - static_smem(name) : it->second;
            break;
        }
        default: *v = 0;
    }
    return OK;
}
CUresult cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                        unsigned int by, unsigned int bz, unsigned int smem, CUstream, void** params, void**) {
    NEED_CTX();
    unsigned long long threads = (unsigned long long)bx * by * bz;
    if (threads == 0 || threads > (unsigned long long)MAX_THREADS || gx == 0 || gy == 0 || gz == 0 || gy > 65535 ||
        gz > 65535 || smem > 227 * 1024) {
        fprintf(stderr, "cuda_emu: invalid launch grid (%u,%u,%u) block (%u,%u,%u) smem %u\n", gx, gy, gz, bx, by,
                bz, smem);
        return ERR_INVALID_VALUE;
    }
    const std::string& name = ((const EmuKernel*)f)->name;
    const std::string refusal = launch_refusal(name, (unsigned)threads, smem);
    if (!refusal.empty()) {
        fprintf(stderr, "cuda_emu: a GPU would refuse this launch (CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES): %s\n",
                refusal.c_str());
        return ERR_LAUNCH_OUT_OF_RESOURCES;
    }
    // by default dynamic shared memory gets what static leaves of 48 KiB
    const unsigned fixed = (unsigned)static_smem(name);
    if (smem + fixed > 48 * 1024) {
        std::lock_guard<std::mutex> lock(dyn_smem_mutex);
        auto it = dyn_smem_limit().find(f);
        if (it == dyn_smem_limit().end() || (unsigned)it->second < smem) {
            fprintf(stderr, "cuda_emu: launch with %u bytes of dynamic shared memory (and %u static), above 48 KiB, "
                    "without cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) to at least that\n", smem, fixed);
            return ERR_INVALID_VALUE;
        }
    }
    ++stats[ST_LAUNCH];
    if (emu_no_work()) {
        std::lock_guard<std::mutex> lock(dyn_smem_mutex);
        LaunchCount& c = launches_of()[(const EmuKernel*)f];
        const unsigned long long blocks = (unsigned long long)gx * gy * gz;
        ++c.n;
        c.min_blocks = std::min(c.min_blocks, blocks);
        c.max_blocks = std::max(c.max_blocks, blocks);
        c.threads = (unsigned)threads;
        return OK;
    }
    const EmuKernel* k = (const EmuKernel*)f;
    const emu_dim3 grid{gx, gy, gz}, block{bx, by, bz};
    if (!deferring()) {
        launch(k, params, grid, block, smem);
        return OK;
    }
    // cuLaunchKernel copies the argument values now: the caller's may be gone by the time
    // the queue runs. 16-byte slots keep every parameter aligned.
    const std::vector<size_t>& sizes = k->param_sizes;
    size_t total = 0;
    std::vector<size_t> at;
    for (size_t sz : sizes) {
        at.push_back(total);
        total += (sz + 15) / 16 * 16;
    }
    auto bytes = std::make_shared<std::vector<std::max_align_t>>(total / sizeof(std::max_align_t) + 1);
    char* base = (char*)bytes->data();
    for (size_t i = 0; i < sizes.size(); ++i) memcpy(base + at[i], params[i], sizes[i]);
    auto ptrs = std::make_shared<std::vector<void*>>();
    for (size_t i = 0; i < sizes.size(); ++i) ptrs->push_back(base + at[i]);
    // (`bytes` is captured to keep the copied values alive until the launch has run)
    enqueue([k, bytes, ptrs, grid, block, smem] { launch(k, ptrs->data(), grid, block, smem); });
    return OK;
}
CUresult cuGetErrorString(CUresult e, const char** s) {
    *s = e == OK ? "no error" : "cuda_emu error";
    return OK;
}
CUresult cuGetErrorName(CUresult e, const char** s) {
    *s = e == OK ? "CUDA_SUCCESS" : "CUDA_ERROR_EMU";
    return OK;
}
}
