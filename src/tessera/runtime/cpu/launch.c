/* Calling compiled kernels from Python at the cost of a method call, not of ctypes.
 *
 * Every generated entry point has one ABI (lang/codegen/c.py):
 *     void entry(int64_t grid0, int64_t grid1, int64_t grid2, const char *args)
 * with each argument in an 8-byte slot: pointers and integers as int64, floats as double.
 * call(address, grid0, grid1, grid2, *args) packs Python ints and floats into those slots
 * on the stack and calls the entry point without the GIL. set_hook(fn) makes every later
 * call also pass its arguments to fn (the graph compiler records launch sequences so).
 * set_timer(fn) makes every later call time the entry point (CLOCK_MONOTONIC, ns) and
 * call fn(address, start, end) (a profile); unset, the cost is one NULL check.
 * set_redirect(fn) makes every later call first ask fn(address, grid0, grid1, grid2, *args):
 * if it returns True it has run the launch elsewhere (on another device) and the entry point
 * is not called; the hook still sees the launch. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#define MAX_SLOTS 256

typedef void (*entry_fn)(int64_t, int64_t, int64_t, const char *);

static PyObject *hook = NULL;  /* called with each launch's arguments, or NULL */
static PyObject *timer = NULL; /* called with each launch's address and times, or NULL */
static PyObject *redirect = NULL; /* asked first whether it runs the launch, or NULL */

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int slot(PyObject *v, char *dst) {
    if (PyLong_CheckExact(v) || PyBool_Check(v)) {
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow) {
            PyErr_SetString(PyExc_OverflowError, "kernel argument does not fit in int64");
            return -1;
        }
        int64_t i = (int64_t)x;
        memcpy(dst, &i, 8);
        return 0;
    }
    if (PyFloat_CheckExact(v)) {
        double d = PyFloat_AS_DOUBLE(v);
        memcpy(dst, &d, 8);
        return 0;
    }
    if (PyLong_Check(v) || PyFloat_Check(v) || PyIndex_Check(v)) {  /* numpy scalars, enums */
        PyObject *n = PyFloat_Check(v) ? PyNumber_Float(v) : PyNumber_Index(v);
        if (n == NULL) return -1;
        int rc = slot(n, dst);
        Py_DECREF(n);
        return rc;
    }
    PyErr_Format(PyExc_TypeError, "kernel argument must be an int or float, not %.100s",
                 Py_TYPE(v)->tp_name);
    return -1;
}

static PyObject *call(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs < 4) {
        PyErr_SetString(PyExc_TypeError, "call(address, grid0, grid1, grid2, *args)");
        return NULL;
    }
    if (nargs - 4 > MAX_SLOTS) {
        PyErr_SetString(PyExc_TypeError, "too many kernel arguments");
        return NULL;
    }
    int64_t head[4];
    for (int i = 0; i < 4; i++) {
        if (slot(args[i], (char *)&head[i]) < 0) return NULL;
    }
    if (head[0] == 0) {
        PyErr_SetString(PyExc_ValueError, "null kernel address");
        return NULL;
    }
    char buf[8 * MAX_SLOTS + 8];
    for (Py_ssize_t i = 4; i < nargs; i++) {
        if (slot(args[i], buf + 8 * (i - 4)) < 0) return NULL;
    }
    if (redirect != NULL) {
        PyObject *r = PyObject_Vectorcall(redirect, args, (size_t)nargs, NULL);
        if (r == NULL) return NULL;
        const int handled = r == Py_True;
        Py_DECREF(r);
        if (handled) goto after;
    }
    entry_fn fn = (entry_fn)(intptr_t)head[0];
    const int timed = timer != NULL;  /* read with the GIL held */
    int64_t t0 = 0, t1 = 0;
    if (head[1] > 0 && head[2] > 0 && head[3] > 0) {
        Py_BEGIN_ALLOW_THREADS
        if (timed) t0 = now_ns();
        fn(head[1], head[2], head[3], buf);
        if (timed) t1 = now_ns();
        Py_END_ALLOW_THREADS
    }
    if (timed && timer != NULL && t0 != 0) {
        PyObject *r = PyObject_CallFunction(timer, "OLL", args[0], (long long)t0,
                                            (long long)t1);
        if (r == NULL) return NULL;
        Py_DECREF(r);
    }
after:
    if (hook != NULL) {
        PyObject *r = PyObject_Vectorcall(hook, args, (size_t)nargs, NULL);
        if (r == NULL) return NULL;
        Py_DECREF(r);
    }
    Py_RETURN_NONE;
}

/* Point *slot at callable fn, or at NULL for None. */
static PyObject *replace(PyObject **slot, PyObject *fn, const char *who) {
    if (fn != Py_None && !PyCallable_Check(fn)) {
        PyErr_Format(PyExc_TypeError, "%s takes a callable or None", who);
        return NULL;
    }
    PyObject *old = *slot;
    *slot = fn == Py_None ? NULL : fn;
    Py_XINCREF(*slot);
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

static PyObject *set_hook(PyObject *self, PyObject *fn) {
    (void)self;
    return replace(&hook, fn, "set_hook");
}

static PyObject *set_timer(PyObject *self, PyObject *fn) {
    (void)self;
    return replace(&timer, fn, "set_timer");
}

static PyObject *set_redirect(PyObject *self, PyObject *fn) {
    (void)self;
    return replace(&redirect, fn, "set_redirect");
}

static PyMethodDef methods[] = {
    {"call", (PyCFunction)(void (*)(void))call, METH_FASTCALL,
     "call(address, grid0, grid1, grid2, *args): run a compiled kernel entry point"},
    {"set_hook", set_hook, METH_O, "set_hook(fn or None): pass every call's arguments to fn"},
    {"set_timer", set_timer, METH_O,
     "set_timer(fn or None): call fn(address, start_ns, end_ns) after every launch"},
    {"set_redirect", set_redirect, METH_O,
     "set_redirect(fn or None): fn(address, grids, *args) returning True runs the launch"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tsr_launch", NULL, -1, methods};

PyMODINIT_FUNC PyInit__tsr_launch(void) { return PyModule_Create(&module); }
