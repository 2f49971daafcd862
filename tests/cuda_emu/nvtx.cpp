// A stand-in for an NVTX library (tests/cuda_emu): records the NVTX ranges the CUDA backend
// opens (src/backend/cuda/nvtx.rs: nvtxRangeStartA / nvtxRangeEnd) and, at exit, writes one
// line per event to the file named by DEEPCUT_NVTX_LOG ("start NAME" / "end NAME"), so a
// test can check that the ranges nsys would show exist and all close. (tests/nvtx.rs checks
// the same calls against a real NVTX library and a tool built on NVIDIA's headers.)
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {
struct Log {
    std::mutex m;
    std::map<uint64_t, std::string> open;
    std::vector<std::string> lines;
    uint64_t next = 1;
    ~Log() {
        const char* path = getenv("DEEPCUT_NVTX_LOG");
        if (!path) return;
        FILE* f = fopen(path, "w");
        if (!f) return;
        for (auto& l : lines) fprintf(f, "%s\n", l.c_str());
        for (auto& kv : open) fprintf(f, "unclosed %s\n", kv.second.c_str());
        fclose(f);
    }
};
Log log_;
}  // namespace

extern "C" {
uint64_t nvtxRangeStartA(const char* m) {
    std::lock_guard<std::mutex> l(log_.m);
    std::string name = m ? m : "?";
    uint64_t id = log_.next++;
    log_.open[id] = name;
    log_.lines.push_back("start " + name);
    return id;
}
void nvtxRangeEnd(uint64_t id) {
    std::lock_guard<std::mutex> l(log_.m);
    auto it = log_.open.find(id);
    log_.lines.push_back("end " + (it == log_.open.end() ? std::string("?unknown id") : it->second));
    if (it != log_.open.end()) log_.open.erase(it);
}
}
