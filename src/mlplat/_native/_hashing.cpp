// Stable 64-bit hashing for routing: XXH64 (xxHash, Yann Collet's specification,
// written from the spec), the same on every machine, process and Python version,
// unlike Python's salted hash(). Loops run with the GIL released.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

namespace py = pybind11;

namespace {

constexpr uint64_t P1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t P2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t P3 = 0x165667B19E3779F9ULL;
constexpr uint64_t P4 = 0x85EBCA77C2B2AE63ULL;
constexpr uint64_t P5 = 0x27D4EB2F165667C5ULL;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

inline uint64_t read64(const uint8_t* p) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return v;  // little-endian hosts (x86-64, aarch64): the spec's byte order
}

inline uint32_t read32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

inline uint64_t round(uint64_t acc, uint64_t input) {
    acc += input * P2;
    acc = rotl(acc, 31);
    return acc * P1;
}

inline uint64_t merge(uint64_t acc, uint64_t val) {
    acc ^= round(0, val);
    return acc * P1 + P4;
}

uint64_t xxh64(const uint8_t* p, size_t len, uint64_t seed) {
    const uint8_t* end = p + len;
    uint64_t h;
    if (len >= 32) {
        uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
        const uint8_t* limit = end - 32;
        do {
            v1 = round(v1, read64(p));
            v2 = round(v2, read64(p + 8));
            v3 = round(v3, read64(p + 16));
            v4 = round(v4, read64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
        h = merge(h, v1);
        h = merge(h, v2);
        h = merge(h, v3);
        h = merge(h, v4);
    } else {
        h = seed + P5;
    }
    h += uint64_t(len);
    while (p + 8 <= end) {
        h ^= round(0, read64(p));
        h = rotl(h, 27) * P1 + P4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= uint64_t(read32(p)) * P1;
        h = rotl(h, 23) * P2 + P3;
        p += 4;
    }
    while (p < end) {
        h ^= uint64_t(*p) * P5;
        h = rotl(h, 11) * P1;
        ++p;
    }
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

}  // namespace

PYBIND11_MODULE(_hashing, m) {
    m.doc() = "XXH64, a stable 64-bit hash (pybind11; batch loops release the GIL).";
    m.def(
        "xxh64",
        [](py::bytes data, uint64_t seed) {
            std::string_view v = data;
            return xxh64(reinterpret_cast<const uint8_t*>(v.data()), v.size(), seed);
        },
        py::arg("data"), py::arg("seed") = 0, "XXH64 of one bytes object.");
    m.def(
        "xxh64_many",
        [](const py::list& items, uint64_t seed) {
            std::vector<std::string> owned;
            owned.reserve(items.size());
            for (auto item : items) owned.emplace_back(py::cast<std::string_view>(item));
            py::array_t<uint64_t> out(py::ssize_t(owned.size()));
            uint64_t* o = out.mutable_data();
            {
                py::gil_scoped_release nogil;
                for (size_t i = 0; i < owned.size(); ++i)
                    o[i] = xxh64(reinterpret_cast<const uint8_t*>(owned[i].data()), owned[i].size(), seed);
            }
            return out;
        },
        py::arg("items"), py::arg("seed") = 0, "XXH64 of each bytes object, as a uint64 array.");
}
