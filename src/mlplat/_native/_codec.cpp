// Online-store record codec: feature rows <-> compact binary records, and the
// Redis commands that carry them.
//
// A record is one (entity, view) value:
//
//   byte 0        format version (1)
//   bytes 1..8    event time, int64 ns, big-endian with the sign bit flipped
//   bytes 9..16   created time, same encoding (INT64_MIN when the view has none)
//   null bitmap   ceil(n_features / 8) bytes, bit i set = feature i is null
//   values        each non-null feature in schema order:
//                   int8/16/32/64, timestamp: 8 bytes little-endian (int64)
//                   float32: 4 bytes, float64: 8 bytes, bool: 1 byte
//                   string/bytes: LEB128 length, then the bytes
//
// Bytes 1..16 compare as unsigned strings exactly as (event, created) compare
// as signed integers, so a Lua script can keep the newer record with a plain
// string comparison. Everything that loops over rows runs with the GIL
// released; Python objects are only read or built with the GIL held.

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

enum Kind : int { INT = 0, FLOAT32 = 1, FLOAT64 = 2, BOOL = 3, STRING = 4, BYTES = 5, TIMESTAMP = 6 };
constexpr uint8_t FORMAT = 1;
constexpr size_t HEADER = 17;

using I64 = py::array_t<int64_t, py::array::c_style>;
using F32 = py::array_t<float, py::array::c_style>;
using F64 = py::array_t<double, py::array::c_style>;
using U8 = py::array_t<uint8_t, py::array::c_style>;
using Bools = py::array_t<bool, py::array::c_style>;

inline void put_be(uint8_t* p, int64_t v) {
    uint64_t u = uint64_t(v) ^ 0x8000000000000000ULL;
    for (int i = 7; i >= 0; --i) {
        p[i] = uint8_t(u & 0xff);
        u >>= 8;
    }
}

inline int64_t get_be(const uint8_t* p) {
    uint64_t u = 0;
    for (int i = 0; i < 8; ++i) u = (u << 8) | p[i];
    return int64_t(u ^ 0x8000000000000000ULL);
}

inline size_t varint_size(uint64_t v) {
    size_t n = 1;
    while (v >= 0x80) {
        v >>= 7;
        ++n;
    }
    return n;
}

inline uint8_t* put_varint(uint8_t* p, uint64_t v) {
    while (v >= 0x80) {
        *p++ = uint8_t(v) | 0x80;
        v >>= 7;
    }
    *p++ = uint8_t(v);
    return p;
}

// Reads a varint; returns false when it runs past end.
inline bool get_varint(const uint8_t*& p, const uint8_t* end, uint64_t& v) {
    v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (p >= end) return false;
        uint8_t b = *p++;
        v |= uint64_t(b & 0x7f) << shift;
        if (!(b & 0x80)) return true;
    }
    return false;
}

}  // namespace

namespace {

// One feature column to encode, as raw buffers captured with the GIL held.
struct Column {
    int kind;
    const void* values = nullptr;  // int64 / float / double / uint8 (bool) array
    const uint8_t* valid = nullptr;  // numpy bool array or null (all valid)
    const void* offsets = nullptr;  // string/bytes: n + 1 offsets
    bool offsets64 = false;
    const uint8_t* data = nullptr;
    size_t data_len = 0;
};

size_t fixed_width(int kind) {
    switch (kind) {
        case INT:
        case TIMESTAMP:
        case FLOAT64:
            return 8;
        case FLOAT32:
            return 4;
        case BOOL:
            return 1;
        default:
            return 0;
    }
}

void check_len(const py::array& a, py::ssize_t n, const char* what) {
    if (a.ndim() != 1 || a.shape(0) != n)
        throw std::invalid_argument(std::string(what) + " has the wrong length");
}

// Every one of the n + 1 offsets inside [0, data_len] and none below the one before: checking the
// first and the last only let a negative length in between wrap a size and overrun a buffer.
template <typename T>
void check_offsets(const T* o, py::ssize_t n, size_t data_len, const char* what) {
    if (n < 0) return;
    if (o[0] < 0 || uint64_t(o[n]) > data_len)
        throw std::invalid_argument(std::string(what) + " offsets point outside the data");
    for (py::ssize_t i = 0; i < n; ++i)
        if (o[i + 1] < o[i]) throw std::invalid_argument(std::string(what) + " offsets go backwards");
}

// Captures the buffers of one column description (see encode_records' docstring).
Column capture(int kind, const py::tuple& spec, py::ssize_t n, std::vector<py::object>& keep) {
    Column c;
    c.kind = kind;
    auto valid_of = [&](const py::handle& obj) -> const uint8_t* {
        if (obj.is_none()) return nullptr;
        auto arr = py::cast<Bools>(obj);
        check_len(arr, n, "validity mask");
        keep.push_back(arr);
        return reinterpret_cast<const uint8_t*>(arr.data());
    };
    if (kind == STRING || kind == BYTES) {
        if (spec.size() != 3) throw std::invalid_argument("a string column is (offsets, data, valid)");
        auto data = py::cast<U8>(spec[1]);
        keep.push_back(data);
        c.data = data.data();
        c.data_len = size_t(data.size());
        py::array off = py::reinterpret_borrow<py::array>(spec[0]);
        if (py::isinstance<py::array_t<int64_t>>(off) && off.dtype().itemsize() == 8) {
            auto o = py::cast<I64>(off);
            check_len(o, n + 1, "offsets");
            keep.push_back(o);
            c.offsets = o.data();
            c.offsets64 = true;
        } else {
            auto o = py::cast<py::array_t<int32_t, py::array::c_style | py::array::forcecast>>(off);
            check_len(o, n + 1, "offsets");
            keep.push_back(o);
            c.offsets = o.data();
        }
        c.valid = valid_of(spec[2]);
        if (c.offsets64)
            check_offsets(static_cast<const int64_t*>(c.offsets), n, c.data_len, "string");
        else
            check_offsets(static_cast<const int32_t*>(c.offsets), n, c.data_len, "string");
        return c;
    }
    if (spec.size() != 2) throw std::invalid_argument("a fixed-width column is (values, valid)");
    py::array values;
    switch (kind) {
        case INT:
        case TIMESTAMP:
            values = py::cast<I64>(spec[0]);
            break;
        case FLOAT32:
            values = py::cast<F32>(spec[0]);
            break;
        case FLOAT64:
            values = py::cast<F64>(spec[0]);
            break;
        case BOOL:
            values = py::cast<Bools>(spec[0]);
            break;
        default:
            throw std::invalid_argument("unknown kind " + std::to_string(kind));
    }
    check_len(values, n, "values");
    keep.push_back(values);
    c.values = values.data();
    c.valid = valid_of(spec[1]);
    return c;
}

inline bool is_valid(const Column& c, py::ssize_t i) { return c.valid == nullptr || c.valid[i]; }

inline size_t str_len(const Column& c, py::ssize_t i, size_t& start) {
    if (c.offsets64) {
        auto o = static_cast<const int64_t*>(c.offsets);
        start = size_t(o[i]);
        return size_t(o[i + 1] - o[i]);
    }
    auto o = static_cast<const int32_t*>(c.offsets);
    start = size_t(o[i]);
    return size_t(o[i + 1] - o[i]);
}

}  // namespace

// Encodes n rows into records; returns (data, offsets) with record i at data[offsets[i]:offsets[i+1]].
py::tuple encode_records(const std::vector<int>& kinds, const py::list& columns, const I64& event_ts,
                         const I64& created_ts) {
    py::ssize_t n = event_ts.shape(0);
    if (py::ssize_t(kinds.size()) != py::ssize_t(columns.size()))
        throw std::invalid_argument("kinds and columns differ in length");
    bool has_created = created_ts.shape(0) != 0;
    if (has_created) check_len(created_ts, n, "created_ts");
    std::vector<py::object> keep;
    std::vector<Column> cols;
    for (size_t f = 0; f < kinds.size(); ++f)
        cols.push_back(capture(kinds[f], py::cast<py::tuple>(columns[f]), n, keep));
    const int64_t* ev = event_ts.data();
    const int64_t* cr = has_created ? created_ts.data() : nullptr;
    size_t nbitmap = (cols.size() + 7) / 8;
    I64 offsets(n + 1);
    int64_t* off = offsets.mutable_data();
    {
        py::gil_scoped_release nogil;
        off[0] = 0;
        for (py::ssize_t i = 0; i < n; ++i) {
            size_t size = HEADER + nbitmap;
            for (const Column& c : cols) {
                if (!is_valid(c, i)) continue;
                size_t w = fixed_width(c.kind);
                if (w) {
                    size += w;
                } else {
                    size_t start, len = str_len(c, i, start);
                    size += varint_size(len) + len;
                }
            }
            off[i + 1] = off[i] + int64_t(size);
        }
    }
    U8 data(off[n]);
    uint8_t* out = data.mutable_data();
    {
        py::gil_scoped_release nogil;
        for (py::ssize_t i = 0; i < n; ++i) {
            uint8_t* p = out + off[i];
            p[0] = FORMAT;
            put_be(p + 1, ev[i]);
            put_be(p + 9, cr ? cr[i] : std::numeric_limits<int64_t>::min());
            uint8_t* bitmap = p + HEADER;
            std::memset(bitmap, 0, nbitmap);
            p = bitmap + nbitmap;
            for (size_t f = 0; f < cols.size(); ++f) {
                const Column& c = cols[f];
                if (!is_valid(c, i)) {
                    bitmap[f / 8] |= uint8_t(1u << (f % 8));
                    continue;
                }
                switch (c.kind) {
                    case INT:
                    case TIMESTAMP:
                    case FLOAT64:
                        std::memcpy(p, static_cast<const uint8_t*>(c.values) + 8 * i, 8);
                        p += 8;
                        break;
                    case FLOAT32:
                        std::memcpy(p, static_cast<const uint8_t*>(c.values) + 4 * i, 4);
                        p += 4;
                        break;
                    case BOOL:
                        *p++ = static_cast<const uint8_t*>(c.values)[i] ? 1 : 0;
                        break;
                    default: {
                        size_t start, len = str_len(c, i, start);
                        p = put_varint(p, len);
                        std::memcpy(p, c.data + start, len);
                        p += len;
                    }
                }
            }
        }
    }
    return py::make_tuple(data, offsets);
}

// ------------------------------------------------------------------ decoding

namespace {

struct Parsed {
    std::vector<int64_t> ints;  // INT, TIMESTAMP, BOOL (0/1)
    std::vector<double> floats;  // FLOAT32 (widened), FLOAT64
    std::vector<const uint8_t*> ptr;  // STRING, BYTES
    std::vector<size_t> len;
    std::vector<uint8_t> present;  // 0: null, missing or expired
};

}  // namespace

// Decodes records[offset + rows[i]] (or records[offset + i] without rows) into one
// Python list per feature. A None record, a null value, a record whose event
// time is before min_event_ts, or a row index of -1 gives None.
// Returns (columns, event_ts array of the records).
py::tuple decode_records(const py::list& records, py::ssize_t offset, py::ssize_t count, const std::vector<int>& kinds,
                         int64_t min_event_ts, const std::optional<I64>& rows) {
    if (offset < 0 || count < 0 || offset > py::ssize_t(records.size()) || count > py::ssize_t(records.size()) - offset)
        throw std::invalid_argument("offset and count fall outside the records");
    py::ssize_t n_out = rows ? rows->shape(0) : count;
    const int64_t* row_of = rows ? rows->data() : nullptr;
    // Our own references to the records: the parse below runs without the GIL and the objects built after
    // it read the records' bytes, so another thread emptying the caller's list must not free them meanwhile.
    py::list held = py::reinterpret_steal<py::list>(PyList_GetSlice(records.ptr(), offset, offset + count));
    if (!held) throw py::error_already_set();
    if (py::ssize_t(held.size()) != count)
        throw std::invalid_argument("offset and count fall outside the records");  // the list shrank meanwhile
    std::vector<const uint8_t*> rec(count, nullptr);
    std::vector<size_t> rec_len(count, 0);
    for (py::ssize_t i = 0; i < count; ++i) {
        PyObject* item = PyList_GET_ITEM(held.ptr(), i);
        if (item == Py_None) continue;
        if (!PyBytes_Check(item))
            throw py::type_error("record " + std::to_string(i) + " is " + Py_TYPE(item)->tp_name + ", not bytes");
        rec[i] = reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(item));
        rec_len[i] = size_t(PyBytes_GET_SIZE(item));
    }
    if (row_of)
        for (py::ssize_t r = 0; r < n_out; ++r)
            if (row_of[r] < -1 || row_of[r] >= count) throw std::invalid_argument("rows index past the records");
    size_t nf = kinds.size();
    for (int k : kinds)
        if (k < INT || k > TIMESTAMP) throw std::invalid_argument("unknown kind " + std::to_string(k));
    std::vector<Parsed> cols(nf);
    for (Parsed& c : cols) {
        c.ints.assign(count, 0);
        c.floats.assign(count, 0.0);
        c.ptr.assign(count, nullptr);
        c.len.assign(count, 0);
        c.present.assign(count, 0);
    }
    I64 event(count);
    int64_t* ev = event.mutable_data();
    py::ssize_t bad = -1;
    {
        py::gil_scoped_release nogil;
        size_t nbitmap = (nf + 7) / 8;
        for (py::ssize_t i = 0; i < count && bad < 0; ++i) {
            ev[i] = std::numeric_limits<int64_t>::min();
            const uint8_t* p = rec[i];
            if (p == nullptr) continue;
            const uint8_t* end = p + rec_len[i];
            if (rec_len[i] < HEADER + nbitmap || p[0] != FORMAT) { bad = i; break; }
            int64_t t = get_be(p + 1);
            if (t < min_event_ts) continue;  // older than the view's ttl allows
            ev[i] = t;
            const uint8_t* bitmap = p + HEADER;
            p = bitmap + nbitmap;
            for (size_t f = 0; f < nf; ++f) {
                if (bitmap[f / 8] & (1u << (f % 8))) continue;
                Parsed& c = cols[f];
                size_t w = fixed_width(kinds[f]);
                if (w && size_t(end - p) < w) { bad = i; break; }
                switch (kinds[f]) {
                    case INT:
                    case TIMESTAMP: std::memcpy(&c.ints[i], p, 8); break;
                    case FLOAT64: std::memcpy(&c.floats[i], p, 8); break;
                    case FLOAT32: { float v; std::memcpy(&v, p, 4); c.floats[i] = v; break; }
                    case BOOL: c.ints[i] = *p != 0; break;
                    default: {
                        uint64_t len;
                        if (!get_varint(p, end, len) || uint64_t(end - p) < len) { bad = i; break; }
                        c.ptr[i] = p;
                        c.len[i] = size_t(len);
                        w = size_t(len);
                    }
                }
                if (bad >= 0) break;
                p += w;
                c.present[i] = 1;
            }
        }
    }
    if (bad >= 0) throw std::invalid_argument("record " + std::to_string(bad) + " is malformed");
    py::list out(nf);
    for (size_t f = 0; f < nf; ++f) {
        const Parsed& c = cols[f];
        // one Python object per distinct record, shared by duplicate rows
        std::vector<PyObject*> obj(count, nullptr);
        for (py::ssize_t i = 0; i < count; ++i) {
            if (!c.present[i]) continue;
            PyObject* o = nullptr;
            switch (kinds[f]) {
                case INT:
                case TIMESTAMP: o = PyLong_FromLongLong(c.ints[i]); break;
                case FLOAT32:
                case FLOAT64: o = PyFloat_FromDouble(c.floats[i]); break;
                case BOOL: o = PyBool_FromLong(long(c.ints[i])); break;
                case STRING:
                    o = PyUnicode_DecodeUTF8(reinterpret_cast<const char*>(c.ptr[i]), py::ssize_t(c.len[i]), "strict");
                    break;
                default: o = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(c.ptr[i]), py::ssize_t(c.len[i]));
            }
            if (o == nullptr) {
                for (PyObject* x : obj) Py_XDECREF(x);
                if (kinds[f] == STRING && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                    PyErr_Clear();
                    throw std::invalid_argument("record " + std::to_string(i) + " is malformed: string feature " +
                                                std::to_string(f) + " is not UTF-8");
                }
                throw py::error_already_set();
            }
            obj[i] = o;
        }
        PyObject* lst = PyList_New(n_out);
        if (lst == nullptr) {
            for (PyObject* x : obj) Py_XDECREF(x);
            throw py::error_already_set();
        }
        for (py::ssize_t r = 0; r < n_out; ++r) {
            py::ssize_t at = row_of ? row_of[r] : r;
            PyObject* o = at < 0 ? nullptr : obj[at];  // -1: a row without a key
            if (o == nullptr) o = Py_None;
            Py_INCREF(o);
            PyList_SET_ITEM(lst, r, o);
        }
        for (PyObject* x : obj) Py_XDECREF(x);
        out[f] = py::reinterpret_steal<py::list>(lst);
    }
    return py::make_tuple(out, event);
}

// --------------------------------------------------------------------- keys
//
// An entity key is the concatenation, for each join key, of
//   0x01 + 8 bytes big-endian with the sign bit flipped   (integers)
//   0x02 + LEB128 length + UTF-8 bytes                     (strings)
// and a Redis key is prefix + "{" + bucket + "}:" + view tag + ":" + entity key,
// where bucket = FNV-1a 64 of the entity key modulo 16384. The braces make the
// bucket Redis Cluster's hash tag: all views of an entity share one slot.

namespace {

constexpr uint64_t FNV_OFFSET = 0xcbf29ce484222325ULL;
constexpr uint64_t FNV_PRIME = 0x100000001b3ULL;
constexpr int64_t BUCKETS = 16384;

inline int64_t bucket_of(const uint8_t* p, size_t n) {
    uint64_t h = FNV_OFFSET;
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * FNV_PRIME;
    return int64_t(h % uint64_t(BUCKETS));
}

void append_int_key(std::string& out, int64_t v) {
    uint8_t b[9];
    b[0] = 0x01;
    put_be(b + 1, v);
    out.append(reinterpret_cast<char*>(b), 9);
}

void append_str_key(std::string& out, const char* p, size_t n) {
    uint8_t b[11];
    b[0] = 0x02;
    uint8_t* e = put_varint(b + 1, n);
    out.append(reinterpret_cast<char*>(b), size_t(e - b));
    out.append(p, n);
}

}  // namespace

// Entity keys from Python values: columns[j][i] is join key j of row i; kinds[j] is
// 0 for integer keys, 1 for string keys. A row with a None value gets None.
py::list entity_keys(const py::list& columns, const std::vector<int>& kinds) {
    if (py::ssize_t(kinds.size()) != py::ssize_t(columns.size()) || kinds.empty())
        throw std::invalid_argument("one kind per key column is needed");
    std::vector<py::sequence> cols;
    py::ssize_t n = -1;
    for (auto c : columns) {
        cols.push_back(py::reinterpret_borrow<py::sequence>(c));
        if (n >= 0 && py::ssize_t(cols.back().size()) != n) throw std::invalid_argument("key columns differ in length");
        n = py::ssize_t(cols.back().size());
    }
    py::list out(n);
    std::string key;
    for (py::ssize_t i = 0; i < n; ++i) {
        key.clear();
        bool null = false;
        for (size_t j = 0; j < cols.size() && !null; ++j) {
            py::object v = cols[j][i];
            if (v.is_none()) { null = true; break; }
            if (kinds[j] == 0) {
                if (PyBool_Check(v.ptr()) || !PyIndex_Check(v.ptr()))
                    throw py::type_error("key column " + std::to_string(j) + " row " + std::to_string(i) +
                                         ": expected an integer, got " + std::string(py::str(py::type::of(v).attr("__name__"))));
                int overflow = 0;
                py::object idx = py::reinterpret_steal<py::object>(PyNumber_Index(v.ptr()));
                if (!idx) throw py::error_already_set();  // its __index__ raised
                long long x = PyLong_AsLongLongAndOverflow(idx.ptr(), &overflow);
                if (x == -1 && !overflow && PyErr_Occurred()) throw py::error_already_set();
                if (overflow) throw py::value_error("key column " + std::to_string(j) + " row " + std::to_string(i) +
                                                    ": integer does not fit in int64");
                append_int_key(key, x);
            } else {
                if (!PyUnicode_Check(v.ptr()))
                    throw py::type_error("key column " + std::to_string(j) + " row " + std::to_string(i) +
                                         ": expected a string, got " + std::string(py::str(py::type::of(v).attr("__name__"))));
                py::ssize_t len;
                const char* s = PyUnicode_AsUTF8AndSize(v.ptr(), &len);
                if (s == nullptr) {  // a lone surrogate ('\udcff', from os.fsdecode): no UTF-8 for it
                    PyErr_Clear();
                    throw py::value_error("key column " + std::to_string(j) + " row " + std::to_string(i) +
                                          ": got text that is not valid UTF-8 (it holds a lone surrogate)");
                }
                append_str_key(key, s, size_t(len));
            }
        }
        out[i] = null ? py::object(py::none()) : py::object(py::bytes(key));
    }
    return out;
}

// Entity keys from Arrow buffers (materialization): columns as in encode_records
// with kinds 0 (int64 values, valid) or 1 (offsets, data, valid). Rows with a null
// key get an empty key (the caller drops them). Returns (data, offsets).
py::tuple entity_keys_buffers(const py::list& columns, const std::vector<int>& kinds, py::ssize_t n) {
    if (py::ssize_t(kinds.size()) != py::ssize_t(columns.size()) || kinds.empty())
        throw std::invalid_argument("one kind per key column is needed");
    if (n < 0) throw std::invalid_argument("n must be >= 0");
    std::vector<py::object> keep;
    std::vector<Column> cols;
    for (size_t j = 0; j < kinds.size(); ++j)
        cols.push_back(capture(kinds[j] == 0 ? INT : STRING, py::cast<py::tuple>(columns[j]), n, keep));
    std::string buf;
    I64 offsets(n + 1);
    int64_t* off = offsets.mutable_data();
    {
        py::gil_scoped_release nogil;
        off[0] = 0;
        std::string key;
        for (py::ssize_t i = 0; i < n; ++i) {
            key.clear();
            bool null = false;
            for (const Column& c : cols) {
                if (!is_valid(c, i)) { null = true; break; }
                if (c.kind == INT) {
                    append_int_key(key, static_cast<const int64_t*>(c.values)[i]);
                } else {
                    size_t start, len = str_len(c, i, start);
                    append_str_key(key, reinterpret_cast<const char*>(c.data + start), len);
                }
            }
            if (!null) buf += key;
            off[i + 1] = int64_t(buf.size());
        }
    }
    U8 data(py::ssize_t(buf.size()));
    std::memcpy(data.mutable_data(), buf.data(), buf.size());
    return py::make_tuple(data, offsets);
}

// Buckets of entity keys given as (data, offsets).
I64 buckets(const U8& data, const I64& offsets) {
    py::ssize_t n = offsets.shape(0) - 1;
    if (n < 0) throw std::invalid_argument("offsets must hold n + 1 entries");
    I64 out(n);
    const uint8_t* d = data.data();
    const int64_t* o = offsets.data();
    int64_t* b = out.mutable_data();
    check_offsets(o, n, size_t(data.size()), "key");
    py::gil_scoped_release nogil;
    for (py::ssize_t i = 0; i < n; ++i) b[i] = bucket_of(d + o[i], size_t(o[i + 1] - o[i]));
    return out;
}

int64_t bucket_of_key(const py::bytes& key) {
    std::string_view v = key;
    return bucket_of(reinterpret_cast<const uint8_t*>(v.data()), v.size());
}

// --------------------------------------------------------------------- RESP

namespace {

// The one spelling of a Redis key: prefix + "{" + bucket + "}:" + tag + ":" + key (the hash tag keeps an
// entity's views in one cluster slot). Writes, single-node reads and cluster reads all build it here.
void append_redis_key(std::string& out, const std::string& prefix, const std::string& bucket,
                      const std::string& tag, const char* key, size_t n) {
    out += prefix;
    out += '{';
    out += bucket;
    out += "}:";
    out += tag;
    out += ':';
    out.append(key, n);
}

struct Resp {
    std::string out;
    void header(size_t n) {
        out += '*';
        out += std::to_string(n);
        out += "\r\n";
    }
    void bulk(const char* p, size_t n) {
        out += '$';
        out += std::to_string(n);
        out += "\r\n";
        out.append(p, n);
        out += "\r\n";
    }
    void bulk(const std::string& s) { bulk(s.data(), s.size()); }
    // the entity's Redis key (append_redis_key) as one bulk string
    void redis_key(const std::string& prefix, const std::string& tag, const uint8_t* key, size_t n) {
        std::string b = std::to_string(bucket_of(key, n));
        size_t total = prefix.size() + 1 + b.size() + 2 + tag.size() + 1 + n;
        out += '$';
        out += std::to_string(total);
        out += "\r\n";
        append_redis_key(out, prefix, b, tag, reinterpret_cast<const char*>(key), n);
        out += "\r\n";
    }
};

}  // namespace

// The Redis key of each entity key under one view tag.
py::list redis_keys(const std::string& prefix, const std::string& tag, const py::list& keys) {
    py::list out(keys.size());
    std::string k;
    for (size_t i = 0; i < keys.size(); ++i) {
        std::string_view e = py::cast<std::string_view>(keys[i]);
        std::string b = std::to_string(bucket_of(reinterpret_cast<const uint8_t*>(e.data()), e.size()));
        k.clear();
        append_redis_key(k, prefix, b, tag, e.data(), e.size());
        out[i] = py::bytes(k);
    }
    return out;
}

// One MGET for every (tag, key) of every group (tags, keys), group by group and
// tag-major inside a group (all keys of tags[0] first).
py::bytes pack_mget(const std::string& prefix, const py::list& groups) {
    std::vector<std::pair<std::vector<std::string>, std::vector<std::string_view>>> gs;
    std::vector<py::list> keep;  // the views below point into these lists' bytes: they must outlive them
    size_t total = 0;
    for (auto g : groups) {
        auto pair = py::cast<py::tuple>(g);
        if (pair.size() != 2) throw std::invalid_argument("a group is (tags, keys)");
        auto tags = py::cast<std::vector<std::string>>(pair[0]);
        std::vector<std::string_view> ks;
        keep.push_back(py::cast<py::list>(pair[1]));  // a new list when the keys came as another iterable
        for (auto k : keep.back()) ks.push_back(py::cast<std::string_view>(k));
        total += tags.size() * ks.size();
        gs.emplace_back(std::move(tags), std::move(ks));
    }
    Resp r;
    r.out.reserve(16 + total * (prefix.size() + 40));
    r.header(1 + total);
    r.bulk("MGET", 4);
    for (const auto& [tags, ks] : gs)
        for (const std::string& tag : tags)
            for (std::string_view k : ks) r.redis_key(prefix, tag, reinterpret_cast<const uint8_t*>(k.data()), k.size());
    return py::bytes(r.out);
}

// A command from whole arguments (e.g. MGET of full Redis keys on a cluster node).
py::bytes pack_command(const py::list& args) {
    Resp r;
    r.header(args.size());
    for (auto a : args) {
        std::string_view v = py::cast<std::string_view>(a);
        r.bulk(v.data(), v.size());
    }
    return py::bytes(r.out);
}

// EVALSHA sha numkeys key... then per key (record, expire-at ms or "0"), for rows[i]
// of (keys, records) given as (data, offsets) buffers.
py::bytes pack_evalsha(const std::string& sha, const std::string& prefix, const std::string& tag, const U8& key_data,
                       const I64& key_offsets, const U8& rec_data, const I64& rec_offsets, const I64& expire_at_ms,
                       const I64& rows) {
    py::ssize_t n = rows.shape(0);
    py::ssize_t n_keys = key_offsets.shape(0) - 1;
    if (rec_offsets.shape(0) != n_keys + 1 || expire_at_ms.shape(0) != n_keys)
        throw std::invalid_argument("keys, records and expiries differ in length");
    const int64_t* ko = key_offsets.data();
    const int64_t* ro = rec_offsets.data();
    const int64_t* ex = expire_at_ms.data();
    const int64_t* rw = rows.data();
    check_offsets(ko, n_keys, size_t(key_data.size()), "key");
    check_offsets(ro, n_keys, size_t(rec_data.size()), "record");
    for (py::ssize_t i = 0; i < n; ++i)
        if (rw[i] < 0 || rw[i] >= n_keys) throw std::invalid_argument("row index past the keys");
    const uint8_t* kd = key_data.data();
    const char* rd = reinterpret_cast<const char*>(rec_data.data());
    Resp r;
    {
        py::gil_scoped_release nogil;
        r.header(3 + 3 * size_t(n));
        r.bulk("EVALSHA", 7);
        r.bulk(sha);
        r.bulk(std::to_string(n));
        for (py::ssize_t i = 0; i < n; ++i) {
            int64_t j = rw[i];
            r.redis_key(prefix, tag, kd + ko[j], size_t(ko[j + 1] - ko[j]));
        }
        for (py::ssize_t i = 0; i < n; ++i) {
            int64_t j = rw[i];
            r.bulk(rd + ro[j], size_t(ro[j + 1] - ro[j]));
            r.bulk(std::to_string(ex[j]));
        }
    }
    return py::bytes(r.out);
}

PYBIND11_MODULE(_codec, m) {
    m.doc() = "Online-store records and Redis commands for mlplat (pybind11, GIL released around the loops).";
    m.attr("FORMAT") = int(FORMAT);
    m.attr("HEADER") = int(HEADER);
    m.attr("BUCKETS") = BUCKETS;
    m.def("encode_records", &encode_records, py::arg("kinds"), py::arg("columns"), py::arg("event_ts").noconvert(),
          py::arg("created_ts").noconvert(), "Encode rows into records; returns (data, offsets).");
    m.def("decode_records", &decode_records, py::arg("records"), py::arg("offset"), py::arg("count"),
          py::arg("kinds"), py::arg("min_event_ts"), py::arg("rows") = py::none(),
          "Decode records into one Python list per feature; returns (columns, event_ts).");
    m.def("entity_keys", &entity_keys, py::arg("columns"), py::arg("kinds"),
          "Entity key bytes from Python values (None for a row with a null key).");
    m.def("entity_keys_buffers", &entity_keys_buffers, py::arg("columns"), py::arg("kinds"), py::arg("n"),
          "Entity key bytes from Arrow buffers; returns (data, offsets).");
    m.def("buckets", &buckets, py::arg("data").noconvert(), py::arg("offsets").noconvert());
    m.def("bucket_of", &bucket_of_key, py::arg("key"));
    m.def("redis_keys", &redis_keys, py::arg("prefix"), py::arg("tag"), py::arg("keys"));
    m.def("pack_mget", &pack_mget, py::arg("prefix"), py::arg("groups"));
    m.def("pack_command", &pack_command, py::arg("args"));
    m.def("pack_evalsha", &pack_evalsha, py::arg("sha"), py::arg("prefix"), py::arg("tag"),
          py::arg("key_data").noconvert(), py::arg("key_offsets").noconvert(), py::arg("rec_data").noconvert(),
          py::arg("rec_offsets").noconvert(), py::arg("expire_at_ms").noconvert(), py::arg("rows").noconvert());
}
