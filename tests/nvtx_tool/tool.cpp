// A minimal NVTX tool (what nsys injects), for tests/nvtx.rs: built against NVIDIA's own NVTX
// 3 headers (the nvidia-nvtx wheel), it takes the core module's range calls through NVTX's
// injection interface (NVTX_INJECTION64_PATH -> InitializeInjectionNvtx2) and logs them, one
// line per event, to the file named by DEEPCUT_NVTX_TOOL_LOG: "start ID NAME", "end ID".
// So the test checks the engine's ranges the way a profiler receives them, through a real
// NVTX front (libnvtx3interop / libnvToolsExt) rather than a stand-in for it.
#include <nvtx3/nvToolsExt.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>

namespace {
std::mutex m;
FILE* out = nullptr;
uint64_t next_id = 1;

void line(const char* kind, uint64_t id, const char* name) {
    std::lock_guard<std::mutex> l(m);
    if (!out) return;
    if (name)
        fprintf(out, "%s %llu %s\n", kind, (unsigned long long)id, name);
    else
        fprintf(out, "%s %llu\n", kind, (unsigned long long)id);
    fflush(out);
}

uint64_t new_id() {
    std::lock_guard<std::mutex> l(m);
    return next_id++;
}

nvtxRangeId_t start_a(const char* msg) {
    uint64_t id = new_id();
    line("start", id, msg ? msg : "?");
    return id;
}

nvtxRangeId_t start_ex(const nvtxEventAttributes_t* a) {
    uint64_t id = new_id();
    const char* name = a && a->messageType == NVTX_MESSAGE_TYPE_ASCII ? a->message.ascii : "?";
    line("start", id, name);
    return id;
}

void end(nvtxRangeId_t id) { line("end", id, nullptr); }
}  // namespace

extern "C" __attribute__((visibility("default"))) int InitializeInjectionNvtx2(NvtxGetExportTableFunc_t get) {
    const char* path = getenv("DEEPCUT_NVTX_TOOL_LOG");
    if (!path || !(out = fopen(path, "w"))) return 0;
    auto cb = static_cast<const NvtxExportTableCallbacks*>(get(NVTX_ETID_CALLBACKS));
    NvtxFunctionTable table = nullptr;
    unsigned int size = 0;
    if (!cb || !cb->GetModuleFunctionTable(NVTX_CB_MODULE_CORE, &table, &size) || !table ||
        size <= NVTX_CBID_CORE_RangeEnd)
        return 0;
    *table[NVTX_CBID_CORE_RangeStartA] = reinterpret_cast<NvtxFunctionPointer>(&start_a);
    *table[NVTX_CBID_CORE_RangeStartEx] = reinterpret_cast<NvtxFunctionPointer>(&start_ex);
    *table[NVTX_CBID_CORE_RangeEnd] = reinterpret_cast<NvtxFunctionPointer>(&end);
    fprintf(out, "attached\n");
    fflush(out);
    return 1;
}
