// Key factorization for joins: maps join-key values to dense int64 codes.
//
// A factorizer is built from the entity (left) side, giving every distinct
// key a code in [0, n) in order of first appearance, then probes the feature
// (right) side chunk by chunk, writing the matching code or -1 for a key the
// entity side does not hold. Null slots (validity false) get -1 on both sides.
//
// The Python objects are only touched with the GIL held; every loop over the
// data runs with the GIL released and writes into arrays allocated beforehand.
// A factorizer is built once: the build claims it (under the GIL) before it
// releases the GIL, so a second build from another thread is refused instead of
// writing the same tables at the same time; lookups only read and may run at once.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

using Int64Array = py::array_t<int64_t, py::array::c_style>;
using Int32Array = py::array_t<int32_t, py::array::c_style>;
using ByteArray = py::array_t<uint8_t, py::array::c_style>;
using BoolArray = py::array_t<bool, py::array::c_style>;
using OptMask = std::optional<BoolArray>;

inline uint64_t fmix64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

inline uint64_t hash_bytes(const uint8_t* p, size_t n) {
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ (n * 0x100000001b3ULL);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        std::memcpy(&w, p + i, 8);
        h = (h ^ fmix64(w)) * 0x87c37b91114253d5ULL;
    }
    uint64_t tail = 0;
    for (size_t s = 0; i < n; ++i, s += 8) tail |= uint64_t(p[i]) << s;
    return fmix64(h ^ fmix64(tail ^ n));
}

size_t table_size_for(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n + 1) cap <<= 1;
    return cap;
}

const bool* mask_ptr(const OptMask& mask, py::ssize_t n, const char* what) {
    if (!mask) return nullptr;
    if (mask->ndim() != 1 || mask->shape(0) != n)
        throw std::invalid_argument(std::string(what) + ": validity mask length does not match the keys");
    return mask->data();
}

Int64Array new_codes(py::ssize_t n) { return Int64Array(n); }

void check_1d(const py::array& a, const char* what) {
    if (a.ndim() != 1) throw std::invalid_argument(std::string(what) + " must be a 1-d array");
}

// The build state of a factorizer. Checked and changed with the GIL held only.
enum class State { empty, building, built };

void claim_for_build(State& state) {
    if (state == State::built) throw std::invalid_argument("factorizer is already built");
    if (state == State::building) throw std::invalid_argument("factorizer is already being built (in another thread)");
    state = State::building;
}

void check_built(State state) {
    if (state != State::built) throw std::invalid_argument("factorizer is not built yet");
}

void check_out(const Int64Array& out, py::ssize_t n) {
    if (out.ndim() != 1 || out.shape(0) != n)
        throw std::invalid_argument("out must be a 1-d int64 array as long as the keys");
    if (!out.writeable()) throw std::invalid_argument("out must be writeable");
}

// ---------------------------------------------------------------- integers

class Int64Factorizer {
  public:
    // Builds from the entity side and returns its codes.
    Int64Array build(const Int64Array& keys, const OptMask& valid) {
        if (state_ != State::empty) claim_for_build(state_);  // throws
        check_1d(keys, "keys");
        py::ssize_t n = keys.shape(0);
        const int64_t* k = keys.data();
        const bool* v = mask_ptr(valid, n, "build");
        Int64Array codes = new_codes(n);
        int64_t* c = codes.mutable_data();
        claim_for_build(state_);
        try {
            py::gil_scoped_release nogil;
            build_impl(k, v, n, c);
        } catch (...) {  // e.g. std::bad_alloc: back to empty, so that the error is not a half-built table
            *this = Int64Factorizer();
            throw;
        }
        state_ = State::built;
        return codes;
    }

    // Writes the code of each key (or -1) into out.
    void lookup(const Int64Array& keys, const OptMask& valid, Int64Array& out) const {
        check_built(state_);
        check_1d(keys, "keys");
        py::ssize_t n = keys.shape(0);
        check_out(out, n);
        const int64_t* k = keys.data();
        const bool* v = mask_ptr(valid, n, "lookup");
        int64_t* c = out.mutable_data();
        py::gil_scoped_release nogil;
        for (py::ssize_t i = 0; i < n; ++i) c[i] = (v && !v[i]) ? -1 : find(k[i]);
    }

    int64_t size() const { return n_unique_; }
    bool dense() const { return !direct_.empty(); }

  private:
    void build_impl(const int64_t* k, const bool* v, py::ssize_t n, int64_t* c) {
        int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
        py::ssize_t n_valid = 0;
        for (py::ssize_t i = 0; i < n; ++i) {
            if (v && !v[i]) continue;
            ++n_valid;
            if (k[i] < lo) lo = k[i];
            if (k[i] > hi) hi = k[i];
        }
        // Dense fast path: keys within a small range index a table directly.
        if (n_valid > 0) {
            uint64_t span = uint64_t(hi) - uint64_t(lo);
            uint64_t limit = std::max<uint64_t>(4 * uint64_t(n_valid), 1u << 16);
            if (span < limit && span < (1ull << 28)) {
                lo_ = lo;
                hi_ = hi;
                direct_.assign(span + 1, -1);
                for (py::ssize_t i = 0; i < n; ++i) {
                    if (v && !v[i]) { c[i] = -1; continue; }
                    int64_t& slot = direct_[uint64_t(k[i]) - uint64_t(lo)];
                    if (slot < 0) slot = n_unique_++;
                    c[i] = slot;
                }
                return;
            }
        }
        size_t cap = table_size_for(size_t(n_valid));
        mask_ = cap - 1;
        keys_.assign(cap, 0);
        codes_.assign(cap, -1);
        for (py::ssize_t i = 0; i < n; ++i) {
            if (v && !v[i]) { c[i] = -1; continue; }
            size_t s = fmix64(uint64_t(k[i])) & mask_;
            while (codes_[s] >= 0 && keys_[s] != k[i]) s = (s + 1) & mask_;
            if (codes_[s] < 0) {
                keys_[s] = k[i];
                codes_[s] = n_unique_++;
            }
            c[i] = codes_[s];
        }
    }

    inline int64_t find(int64_t key) const {
        if (!direct_.empty()) {
            if (key < lo_ || key > hi_) return -1;
            return direct_[uint64_t(key) - uint64_t(lo_)];
        }
        if (codes_.empty()) return -1;
        size_t s = fmix64(uint64_t(key)) & mask_;
        while (codes_[s] >= 0) {
            if (keys_[s] == key) return codes_[s];
            s = (s + 1) & mask_;
        }
        return -1;
    }

    State state_ = State::empty;
    int64_t n_unique_ = 0;
    int64_t lo_ = 0, hi_ = -1;
    std::vector<int64_t> direct_;
    size_t mask_ = 0;
    std::vector<int64_t> keys_;
    std::vector<int64_t> codes_;
};

// ----------------------------------------------------------------- strings

// Variable-length binary keys in Arrow layout: offsets (n + 1 entries, int32 or
// int64) into a data buffer.
template <typename Off>
struct BinaryView {
    const Off* off;
    const uint8_t* data;
    py::ssize_t n;
    size_t data_len;
};

template <typename Off>
BinaryView<Off> view_of(const py::array_t<Off, py::array::c_style>& offsets, const ByteArray& data,
                        const char* what) {
    if (offsets.ndim() != 1 || offsets.shape(0) < 1)
        throw std::invalid_argument(std::string(what) + ": offsets must hold n + 1 entries");
    BinaryView<Off> b{offsets.data(), data.data(), offsets.shape(0) - 1, size_t(data.size())};
    if (b.off[0] < 0 || size_t(b.off[b.n]) > b.data_len)
        throw std::invalid_argument(std::string(what) + ": offsets point outside the data buffer");
    for (py::ssize_t i = 0; i < b.n; ++i)
        if (b.off[i + 1] < b.off[i]) throw std::invalid_argument(std::string(what) + ": offsets decrease");
    return b;
}

class BinaryFactorizer {
  public:
    template <typename Off>
    Int64Array build(const py::array_t<Off, py::array::c_style>& offsets, const ByteArray& data,
                     const OptMask& valid) {
        if (state_ != State::empty) claim_for_build(state_);  // throws
        BinaryView<Off> b = view_of(offsets, data, "build");
        const bool* v = mask_ptr(valid, b.n, "build");
        Int64Array codes = new_codes(b.n);
        int64_t* c = codes.mutable_data();
        claim_for_build(state_);
        try {
            py::gil_scoped_release nogil;
            size_t cap = table_size_for(size_t(b.n));
            mask_ = cap - 1;
            slots_.assign(cap, Slot{0, 0, 0, -1});
            for (py::ssize_t i = 0; i < b.n; ++i) {
                if (v && !v[i]) { c[i] = -1; continue; }
                const uint8_t* p = b.data + b.off[i];
                size_t len = size_t(b.off[i + 1] - b.off[i]);
                uint64_t h = hash_bytes(p, len);
                size_t s = slot_of(h, p, len);
                if (slots_[s].code < 0) {
                    slots_[s] = Slot{h, arena_.size(), len, n_unique_++};
                    arena_.insert(arena_.end(), p, p + len);
                }
                c[i] = slots_[s].code;
            }
        } catch (...) {
            *this = BinaryFactorizer();
            throw;
        }
        state_ = State::built;
        return codes;
    }

    template <typename Off>
    void lookup(const py::array_t<Off, py::array::c_style>& offsets, const ByteArray& data, const OptMask& valid,
                Int64Array& out) const {
        check_built(state_);
        BinaryView<Off> b = view_of(offsets, data, "lookup");
        check_out(out, b.n);
        const bool* v = mask_ptr(valid, b.n, "lookup");
        int64_t* c = out.mutable_data();
        py::gil_scoped_release nogil;
        for (py::ssize_t i = 0; i < b.n; ++i) {
            if (v && !v[i]) { c[i] = -1; continue; }
            const uint8_t* p = b.data + b.off[i];
            size_t len = size_t(b.off[i + 1] - b.off[i]);
            c[i] = slots_[slot_of(hash_bytes(p, len), p, len)].code;  // an empty slot holds -1
        }
    }

    int64_t size() const { return n_unique_; }

  private:
    struct Slot {
        uint64_t hash;
        size_t start;
        size_t len;
        int64_t code;
    };

    inline bool same(const Slot& s, uint64_t h, const uint8_t* p, size_t len) const {
        return s.hash == h && s.len == len && (len == 0 || std::memcmp(arena_.data() + s.start, p, len) == 0);
    }

    // The slot holding this key, or the empty slot where it would go (linear probing).
    inline size_t slot_of(uint64_t h, const uint8_t* p, size_t len) const {
        size_t s = h & mask_;
        while (slots_[s].code >= 0 && !same(slots_[s], h, p, len)) s = (s + 1) & mask_;
        return s;
    }

    State state_ = State::empty;
    int64_t n_unique_ = 0;
    size_t mask_ = 0;
    std::vector<Slot> slots_;
    std::vector<uint8_t> arena_;
};

// Combines two code columns into one: (a, b) -> a * n_b + b, -1 if either is -1.
Int64Array combine_codes(const Int64Array& a, const Int64Array& b, int64_t n_b) {
    check_1d(a, "a");
    check_1d(b, "b");
    py::ssize_t n = a.shape(0);
    if (b.shape(0) != n) throw std::invalid_argument("code columns differ in length");
    if (n_b < 0) throw std::invalid_argument("n_b must be >= 0");
    Int64Array out(n);
    const int64_t* pa = a.data();
    const int64_t* pb = b.data();
    int64_t* po = out.mutable_data();
    bool overflow = false;
    {
        py::gil_scoped_release nogil;
        for (py::ssize_t i = 0; i < n; ++i) {
            if (pa[i] < 0 || pb[i] < 0) { po[i] = -1; continue; }
            int64_t r;
            if (__builtin_mul_overflow(pa[i], n_b, &r) || __builtin_add_overflow(r, pb[i], &r)) {
                overflow = true;
                break;
            }
            po[i] = r;
        }
    }
    if (overflow) throw std::overflow_error("combined key code overflows int64");
    return out;
}

}  // namespace

PYBIND11_MODULE(_keys, m) {
    m.doc() = "Native key factorization for mlplat's joins (pybind11, GIL released around the loops).";

    py::class_<Int64Factorizer>(m, "Int64Factorizer")
        .def(py::init<>())
        .def("build", &Int64Factorizer::build, py::arg("keys").noconvert(), py::arg("valid") = py::none(),
             "Assign dense codes to the keys (first appearance order); returns the codes.")
        .def("lookup", &Int64Factorizer::lookup, py::arg("keys").noconvert(), py::arg("valid") = py::none(),
             py::arg("out").noconvert(), "Write each key's code, or -1 when unknown or null, into out.")
        .def_property_readonly("size", &Int64Factorizer::size)
        .def_property_readonly("dense", &Int64Factorizer::dense);

    py::class_<BinaryFactorizer>(m, "BinaryFactorizer")
        .def(py::init<>())
        .def("build", &BinaryFactorizer::build<int32_t>, py::arg("offsets").noconvert(),
             py::arg("data").noconvert(), py::arg("valid") = py::none())
        .def("build", &BinaryFactorizer::build<int64_t>, py::arg("offsets").noconvert(),
             py::arg("data").noconvert(), py::arg("valid") = py::none())
        .def("lookup", &BinaryFactorizer::lookup<int32_t>, py::arg("offsets").noconvert(),
             py::arg("data").noconvert(), py::arg("valid") = py::none(), py::arg("out").noconvert())
        .def("lookup", &BinaryFactorizer::lookup<int64_t>, py::arg("offsets").noconvert(),
             py::arg("data").noconvert(), py::arg("valid") = py::none(), py::arg("out").noconvert())
        .def_property_readonly("size", &BinaryFactorizer::size);

    m.def("combine_codes", &combine_codes, py::arg("a").noconvert(), py::arg("b").noconvert(), py::arg("n_b"),
          "Pair two code columns into one int64 code: a * n_b + b, -1 where either is -1.");
}
