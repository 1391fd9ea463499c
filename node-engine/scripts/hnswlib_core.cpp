// hnswlib searched in-process from C++, with no Python binding in the timed path.
//
// The peer kit times hnswlib through its Python binding, so each single query also pays the
// binding's per-call cost, while `shoal-engine bench` times our search in-process. This program
// measures hnswlib's own search time with the same protocol as `shoal-engine bench --mode
// single` (the first N queries, one call each, on one thread; the median of R runs) so the two
// can be compared core to core. Build: hnswlib's headers, `g++ -O3 -march=native -DNDEBUG`
// (the flags hnswlib's binding is compiled with). See hnswlib_core.sh.
//
// Usage: hnswlib_core DATASET_DIR l2|ip M EF_CONSTRUCTION EF[,EF...] SINGLE_QUERIES REPS
// Prints one JSON line per ef.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "hnswlib/hnswlib.h"

namespace {

struct Matrix {
    size_t rows = 0;
    size_t dim = 0;
    std::vector<float> data;  // ivecs entries are stored bit-for-bit and read back as int32
};

// Reads a .fvecs / .ivecs file: per row an int32 dimension, then that many 4-byte values.
Matrix read_vecs(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) {
        std::fprintf(stderr, "cannot open %s\n", path.c_str());
        std::exit(2);
    }
    Matrix m;
    int32_t d = 0;
    while (in.read(reinterpret_cast<char*>(&d), 4)) {
        if (d <= 0 || (m.dim != 0 && static_cast<size_t>(d) != m.dim)) {
            std::fprintf(stderr, "%s: bad dimension %d in row %zu\n", path.c_str(), d, m.rows);
            std::exit(2);
        }
        m.dim = static_cast<size_t>(d);
        size_t at = m.data.size();
        m.data.resize(at + m.dim);
        if (!in.read(reinterpret_cast<char*>(m.data.data() + at), 4 * m.dim)) {
            std::fprintf(stderr, "%s: truncated row %zu\n", path.c_str(), m.rows);
            std::exit(2);
        }
        m.rows++;
    }
    return m;
}

int32_t truth_at(const Matrix& gt, size_t row, size_t j) {
    int32_t v;
    std::memcpy(&v, &gt.data[row * gt.dim + j], 4);
    return v;
}

// A positive integer argument, or exit with a message naming it.
size_t positive(const std::string& what, const std::string& s) {
    size_t used = 0;
    unsigned long v = 0;
    try {
        v = std::stoul(s, &used);
    } catch (const std::exception&) {
        used = 0;
    }
    if (used == 0 || used != s.size() || v == 0) {
        std::fprintf(stderr, "%s must be a positive integer, got '%s'\n", what.c_str(), s.c_str());
        std::exit(2);
    }
    return v;
}

std::vector<size_t> parse_list(const std::string& s) {
    std::vector<size_t> out;
    std::stringstream ss(s);
    std::string item;
    while (std::getline(ss, item, ',')) out.push_back(positive("each EF", item));
    if (out.empty()) positive("EF", "");
    return out;
}

double seconds_since(std::chrono::steady_clock::time_point t) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 8) {
        std::fprintf(stderr,
                     "usage: %s DATASET_DIR l2|ip M EF_CONSTRUCTION EF[,EF...] SINGLE_QUERIES REPS\n",
                     argv[0]);
        return 2;
    }
    const std::string dir = argv[1], metric = argv[2];
    const size_t m = positive("M", argv[3]), efc = positive("EF_CONSTRUCTION", argv[4]);
    const std::vector<size_t> efs = parse_list(argv[5]);
    const size_t single = positive("SINGLE_QUERIES", argv[6]), reps = positive("REPS", argv[7]);
    const size_t k = 10;
    if (metric != "l2" && metric != "ip") {
        std::fprintf(stderr, "metric must be l2 or ip, got %s\n", metric.c_str());
        return 2;
    }
    Matrix base = read_vecs(dir + "/base.fvecs");
    Matrix query = read_vecs(dir + "/query.fvecs");
    Matrix gt = read_vecs(dir + "/groundtruth.ivecs");
    if (query.dim != base.dim || gt.rows != query.rows || gt.dim < k) {
        std::fprintf(stderr, "dataset shapes do not match\n");
        return 2;
    }
    std::unique_ptr<hnswlib::SpaceInterface<float>> space;
    if (metric == "l2")
        space.reset(new hnswlib::L2Space(base.dim));
    else
        space.reset(new hnswlib::InnerProductSpace(base.dim));

    // Build as the Python binding's add_items does with 2 threads: row 0 first, then the rest
    // shared out one row at a time.
    auto t0 = std::chrono::steady_clock::now();
    hnswlib::HierarchicalNSW<float> index(space.get(), base.rows, m, efc, 100);
    index.addPoint(base.data.data(), 0);
    std::atomic<size_t> next{1};
    std::vector<std::thread> workers;
    for (int t = 0; t < 2; t++) {
        workers.emplace_back([&] {
            for (size_t row = next++; row < base.rows; row = next++)
                index.addPoint(base.data.data() + row * base.dim, row);
        });
    }
    for (auto& w : workers) w.join();
    const double build_s = seconds_since(t0);

    const size_t timed = std::min(single, query.rows);
    for (size_t ef : efs) {
        index.setEf(ef);
        // Recall over every query, as the sweep's operating point is chosen.
        size_t hits = 0;
        for (size_t i = 0; i < query.rows; i++) {
            auto res = index.searchKnn(query.data.data() + i * query.dim, k);
            while (!res.empty()) {
                const int32_t id = static_cast<int32_t>(res.top().second);
                res.pop();
                for (size_t j = 0; j < k; j++) hits += truth_at(gt, i, j) == id;
            }
        }
        std::vector<double> runs;
        std::vector<double> lat;
        size_t sink = 0;
        for (size_t r = 0; r < reps; r++) {
            auto start = std::chrono::steady_clock::now();
            for (size_t i = 0; i < timed; i++) {
                auto q0 = std::chrono::steady_clock::now();
                auto res = index.searchKnn(query.data.data() + i * query.dim, k);
                sink += res.size();
                if (r == 0) lat.push_back(seconds_since(q0) * 1e6);
            }
            runs.push_back(seconds_since(start));
        }
        std::sort(runs.begin(), runs.end());
        std::sort(lat.begin(), lat.end());
        const double median = runs[runs.size() / 2];
        std::printf(
            "{\"system\":\"hnswlib-core\",\"M\":%zu,\"efConstruction\":%zu,\"ef\":%zu,"
            "\"build_s\":%.3f,\"recall_at_k\":%.4f,\"queries\":%zu,\"reps\":%zu,"
            "\"qps\":%.1f,\"p50_us\":%.1f,\"results\":%zu}\n",
            m, efc, ef, build_s, static_cast<double>(hits) / (query.rows * k), timed, reps,
            timed / median, lat.empty() ? 0.0 : lat[lat.size() / 2], sink);
        std::fflush(stdout);
    }
    return 0;
}
