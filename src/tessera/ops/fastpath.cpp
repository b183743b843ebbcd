// The eager ops' fast path: the guard, output allocation and launch of a small op done in
// C++ against torch's own tensor API, so a cached call costs about what torch's own
// dispatch does (Python attribute access and torch.empty cost ~0.2-2 us each).
//
// Python compiles the kernels and registers "plans" (entry address + launch parameters) in
// tables, one table per operator variant (e.g. "add", "gelu_tanh", "layer_norm"). A call
// checks everything that chose its plan; anything unusual returns None and the Python path
// handles it (and registers a plan for next time). It never raises for bad input: the
// Python path reports that. set_timer(fn) makes every launch timed (CLOCK_MONOTONIC, ns)
// and reported as fn(address, start, end) (a profile); unset, it costs one NULL check.
#include <Python.h>
#include <ATen/ATen.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <cstring>
#include <ctime>
#include <vector>

namespace {

typedef void (*entry_fn)(int64_t, int64_t, int64_t, const char *);

constexpr int kMaxOperands = 3;
constexpr int64_t kParallelGrain = 32768;  // as lang/codegen/c.py: release the GIL above

struct Plan {
    int64_t address = 0;
    int n = 0;                                   // tensor operands
    c10::ScalarType in[kMaxOperands];            // pointwise: operand dtypes
    c10::ScalarType out;                         // result dtype
    int64_t block = 0;                           // pointwise: elements per program
    int64_t scalars[2] = {0, 0};                 // pointwise: trailing 8-byte slots
    int nscalars = 0;
    // rows: weight/bias presence and dtypes, tile (bm, bn) and whether a row is one tile
    bool has_w = false, has_b = false;
    c10::ScalarType wdt = c10::ScalarType::Float, bdt = c10::ScalarType::Float;
    int64_t bm = 0, bn = 0;
    bool one = false;
    bool exact = false;                          // rows: only for rows exactly bn long
};

std::vector<std::vector<Plan>> tables;
PyObject *timer = nullptr;  // called with each launch's address and times, or null

inline int64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

inline bool is_plain_tensor(PyObject *o) {
    // torch.Tensor and nn.Parameter only: subclasses may override __torch_function__
    return THPVariable_CheckExact(o) || (THPVariable_Check(o) &&
           strcmp(Py_TYPE(o)->tp_name, "Parameter") == 0);
}

inline bool usable(const at::Tensor &t) {
    return t.device().is_cpu() && t.layout() == at::kStrided && t.is_contiguous() &&
           !t.is_neg() && !t.is_conj();
}

inline void put(char *buf, int &slot, int64_t v) { std::memcpy(buf + 8 * slot++, &v, 8); }
inline void put(char *buf, int &slot, double v) { std::memcpy(buf + 8 * slot++, &v, 8); }

PyObject *run(const Plan &p, int64_t grid0, const char *buf, int64_t work, at::Tensor &out) {
    entry_fn fn = reinterpret_cast<entry_fn>(p.address);
    PyObject *timed = timer;
    int64_t t0 = 0, t1 = 0;
    if (work >= kParallelGrain) {
        Py_BEGIN_ALLOW_THREADS
        if (timed) t0 = now_ns();
        fn(grid0, 1, 1, buf);
        if (timed) t1 = now_ns();
        Py_END_ALLOW_THREADS
    } else {
        if (timed) t0 = now_ns();
        fn(grid0, 1, 1, buf);
        if (timed) t1 = now_ns();
    }
    if (timed && timer) {
        PyObject *r = PyObject_CallFunction(timer, "LLL", static_cast<long long>(p.address),
                                            static_cast<long long>(t0),
                                            static_cast<long long>(t1));
        if (r == nullptr) return nullptr;
        Py_DECREF(r);
    }
    return THPVariable_Wrap(std::move(out));
}

// reduce.py's _width: n rounded up to 16, at most cap.
inline int64_t width(int64_t n, int64_t cap) {
    const int64_t w = (n + 15) / 16 * 16;
    return w < cap ? w : cap;
}

// reduce.py's _row_tile rows: the largest power of two at most 4096 / bn (at least 1).
inline int64_t tile_rows(int64_t bn) {
    int64_t bm = 1;
    while (bm * 2 <= 4096 / bn) bm *= 2;
    return bm;
}

bool table_arg(PyObject *o, size_t &table) {
    if (!PyLong_CheckExact(o)) return false;
    long long t = PyLong_AsLongLong(o);
    if (t < 0 || static_cast<size_t>(t) >= tables.size()) return false;
    table = static_cast<size_t>(t);
    return true;
}

// pointwise(table, t0[, t1[, t2]]): operands of one shape, contiguous, on the CPU.
PyObject *pointwise(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    size_t table;
    int n = static_cast<int>(nargs) - 1;
    if (n < 1 || n > kMaxOperands || !table_arg(args[0], table)) Py_RETURN_NONE;
    const at::Tensor *t[kMaxOperands];
    for (int i = 0; i < n; i++) {
        if (!is_plain_tensor(args[i + 1])) Py_RETURN_NONE;
        t[i] = &THPVariable_Unpack(args[i + 1]);
        if (!usable(*t[i]) || (i && !t[i]->sizes().equals(t[0]->sizes()))) Py_RETURN_NONE;
    }
    const int64_t numel = t[0]->numel();
    if (numel == 0) Py_RETURN_NONE;
    for (const Plan &p : tables[table]) {
        if (p.n != n) continue;
        bool match = true;
        for (int i = 0; i < n; i++) match = match && t[i]->scalar_type() == p.in[i];
        if (!match) continue;
        try {
            at::Tensor out = at::empty(t[0]->sizes(), at::TensorOptions().dtype(p.out));
            char buf[8 * 16];
            int slot = 0;
            for (int i = 0; i < n; i++) {
                put(buf, slot, reinterpret_cast<int64_t>(t[i]->data_ptr()));
                put(buf, slot, numel);
                put(buf, slot, int64_t{1});
            }
            put(buf, slot, reinterpret_cast<int64_t>(out.data_ptr()));
            put(buf, slot, numel);
            put(buf, slot, int64_t{1});
            for (int i = 0; i < p.nscalars; i++) put(buf, slot, p.scalars[i]);
            return run(p, (numel + p.block - 1) / p.block, buf, numel * (n + 1), out);
        } catch (...) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
    }
    Py_RETURN_NONE;
}

// One optional 1-D operand of length n (weight or bias) for a rows plan.
bool vector_arg(PyObject *o, int64_t n, const at::Tensor *&v) {
    if (o == Py_None) {
        v = nullptr;
        return true;
    }
    if (!is_plain_tensor(o)) return false;
    v = &THPVariable_Unpack(o);
    return usable(*v) && v->dim() == 1 && v->size(0) == n;
}

// rows(table, x, weight, bias, eps, normalized): softmax / log_softmax over the last dim
// (weight = bias = None, eps unused) or layer/RMS norm over it; `normalized` is the
// normalized_shape argument (None for softmax: the last dim).
PyObject *rows(PyObject *, PyObject *const *args, Py_ssize_t nargs) {
    size_t table;
    if (nargs != 6 || !table_arg(args[0], table) || !is_plain_tensor(args[1]))
        Py_RETURN_NONE;
    const at::Tensor &x = THPVariable_Unpack(args[1]);
    if (!usable(x) || x.dim() < 1) Py_RETURN_NONE;
    const int64_t n = x.size(-1);
    const int64_t m = n ? x.numel() / n : 0;
    if (n == 0 || m == 0) Py_RETURN_NONE;
    PyObject *ns = args[5];
    if (ns != Py_None) {  // normalized_shape must be exactly [n]
        if (!(PyList_CheckExact(ns) || PyTuple_CheckExact(ns)) || PySequence_Fast_GET_SIZE(ns) != 1)
            Py_RETURN_NONE;
        PyObject *d = PySequence_Fast_GET_ITEM(ns, 0);
        if (!PyLong_CheckExact(d) || PyLong_AsLongLong(d) != n) Py_RETURN_NONE;
    }
    const at::Tensor *w, *b;
    if (!vector_arg(args[2], n, w) || !vector_arg(args[3], n, b)) Py_RETURN_NONE;
    double eps;
    if (args[4] == Py_None) {  // rms_norm's default: float32's epsilon (torch's opmath)
        eps = 1.1920928955078125e-07;
    } else if (PyFloat_CheckExact(args[4])) {
        eps = PyFloat_AS_DOUBLE(args[4]);
        if (!(eps >= 0)) Py_RETURN_NONE;
    } else {
        Py_RETURN_NONE;
    }
    const bool one = n <= 4096;
    const int64_t bn = width(n, one ? 4096 : 1024), bm = tile_rows(bn);
    for (const Plan &p : tables[table]) {
        if (p.in[0] != x.scalar_type() || p.bn != bn || p.bm != bm || p.one != one ||
            p.exact != (n == bn) ||
            p.has_w != (w != nullptr) || p.has_b != (b != nullptr) ||
            (w && w->scalar_type() != p.wdt) || (b && b->scalar_type() != p.bdt))
            continue;
        try {
            at::Tensor out = at::empty(x.sizes(), at::TensorOptions().dtype(p.out));
            char buf[8 * 24];
            int slot = 0;
            auto rows2 = [&](const void *ptr) {  // an [m, n] contiguous operand
                put(buf, slot, reinterpret_cast<int64_t>(ptr));
                put(buf, slot, m);
                put(buf, slot, n);
                put(buf, slot, n);
                put(buf, slot, int64_t{1});
            };
            rows2(x.data_ptr());
            if (p.n == 3) {  // norm_rows(x, w, b, out, N, eps): absent w/b are x itself
                for (const at::Tensor *v : {w, b}) {
                    if (v) {
                        put(buf, slot, reinterpret_cast<int64_t>(v->data_ptr()));
                        put(buf, slot, n);
                        put(buf, slot, int64_t{1});
                    } else {
                        rows2(x.data_ptr());
                    }
                }
            }
            rows2(out.data_ptr());
            put(buf, slot, n);
            if (p.n == 3) put(buf, slot, eps);
            return run(p, (m + p.bm - 1) / p.bm, buf, m * n * 2, out);
        } catch (...) {
            PyErr_Clear();
            Py_RETURN_NONE;
        }
    }
    Py_RETURN_NONE;
}

bool scalar_type(PyObject *o, c10::ScalarType &out) {
    if (!THPDtype_Check(o)) return false;
    out = reinterpret_cast<THPDtype *>(o)->scalar_type;
    return true;
}

// add_plan(table, address, in_dtypes, out_dtype, block, scalars, rows)
//   pointwise: scalars is a tuple of up to 2 ints/floats (8-byte slots), rows is None;
//   rows: rows = (has_w, has_b, w_dtype, b_dtype, bm, bn, one, exact), in_dtypes = (x dtype,)
//   and block unused; a norm plan has 3 "operands" (x, w, b), softmax 1.
PyObject *add_plan(PyObject *, PyObject *args) {
    long long table, address, block;
    PyObject *ins, *outd, *scalars, *rowspec;
    if (!PyArg_ParseTuple(args, "LLO!OLO!O", &table, &address, &PyTuple_Type, &ins, &outd,
                          &block, &PyTuple_Type, &scalars, &rowspec))
        return nullptr;
    if (table < 0 || table > 4096 || address == 0) {
        PyErr_SetString(PyExc_ValueError, "bad plan");
        return nullptr;
    }
    Plan p;
    p.address = address;
    p.block = block;
    p.n = static_cast<int>(PyTuple_GET_SIZE(ins));
    if (p.n < 1 || p.n > kMaxOperands || PyTuple_GET_SIZE(scalars) > 2 ||
        !scalar_type(outd, p.out)) {
        PyErr_SetString(PyExc_ValueError, "bad plan operands");
        return nullptr;
    }
    for (int i = 0; i < p.n; i++) {
        if (!scalar_type(PyTuple_GET_ITEM(ins, i), p.in[i])) {
            PyErr_SetString(PyExc_TypeError, "plan dtypes must be torch dtypes");
            return nullptr;
        }
    }
    p.nscalars = static_cast<int>(PyTuple_GET_SIZE(scalars));
    for (int i = 0; i < p.nscalars; i++) {
        PyObject *s = PyTuple_GET_ITEM(scalars, i);
        if (PyFloat_Check(s)) {
            double d = PyFloat_AsDouble(s);
            std::memcpy(&p.scalars[i], &d, 8);
        } else {
            p.scalars[i] = PyLong_AsLongLong(s);
        }
    }
    if (rowspec != Py_None) {
        int hw, hb, one, exact;
        long long bm, bn;
        PyObject *wd, *bd;
        if (!PyArg_ParseTuple(rowspec, "ppOOLLpp", &hw, &hb, &wd, &bd, &bm, &bn, &one,
                              &exact) ||
            !scalar_type(wd, p.wdt) || !scalar_type(bd, p.bdt)) {
            PyErr_SetString(PyExc_ValueError, "bad rows plan");
            return nullptr;
        }
        p.has_w = hw, p.has_b = hb, p.bm = bm, p.bn = bn, p.one = one, p.exact = exact;
    }
    if (PyErr_Occurred()) return nullptr;
    if (static_cast<size_t>(table) >= tables.size()) tables.resize(table + 1);
    tables[table].push_back(p);
    Py_RETURN_NONE;
}

PyObject *set_timer(PyObject *, PyObject *fn) {
    if (fn != Py_None && !PyCallable_Check(fn)) {
        PyErr_SetString(PyExc_TypeError, "set_timer takes a callable or None");
        return nullptr;
    }
    Py_XDECREF(timer);
    timer = fn == Py_None ? nullptr : fn;
    Py_XINCREF(timer);
    Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"pointwise", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(pointwise)),
     METH_FASTCALL, "pointwise(table, *tensors): a result, or None for the Python path"},
    {"rows", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(rows)),
     METH_FASTCALL, "rows(table, x, weight, bias, eps, normalized): a result, or None"},
    {"add_plan", add_plan, METH_VARARGS, "register a compiled kernel as a plan"},
    {"set_timer", set_timer, METH_O,
     "set_timer(fn or None): call fn(address, start_ns, end_ns) after every launch"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tsr_fastpath", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__tsr_fastpath(void) { return PyModule_Create(&module); }
