/* Replaying a recorded launch sequence: the compiled graph's native executor.
 *
 * A plan is arrays the Python side builds once per input signature (graph/executable.py):
 *   steps:  per launch {entry, grid0, grid1, grid2, first slot, slot count, first reloc,
 *           reloc count} (8 int64 each)
 *   slots:  every launch's 8-byte argument slots as recorded
 *   relocs: {slot index, base index, byte offset} (3 int64 each): that slot becomes
 *           bases[base] + offset (the arena, an input, a fresh output, ...)
 *   checks: {base index, byte offset} (2 int64 each): status words kernels write, non-zero
 *           on failure
 * run(steps, first, last, slots, relocs, bases, checks, nchecks) runs launches
 * [first, last) without the GIL and returns the index of the first failed check, or -1.
 * Entry points have lang/codegen/c.py's ABI: entry(grid0, grid1, grid2, slots).
 *
 * Built a second time with -DTESSERA_PROFILE (module _tsr_replay_prof), for calls made
 * while a profile is active: run takes a ninth argument, the address of an int64 array of
 * 2 * (last - first) that receives each launch's start and end (CLOCK_MONOTONIC, ns).
 * The default build has no timers at all. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#ifdef TESSERA_PROFILE
#include <time.h>
#define NARGS 9
#define MODULE_NAME "_tsr_replay_prof"
#define PROFILE_ARG , int64_t *times
#else
#define NARGS 8
#define MODULE_NAME "_tsr_replay"
#define PROFILE_ARG
#endif

#define MAX_SLOTS 256

typedef void (*entry_fn)(int64_t, int64_t, int64_t, const char *);

/* The builtin entry points a recording may name. */
static void tsr_memset(int64_t g0, int64_t g1, int64_t g2, const char *args) {
    (void)g0; (void)g1; (void)g2;
    void *p;
    int64_t n;
    memcpy(&p, args, 8);
    memcpy(&n, args + 8, 8);
    memset(p, 0, (size_t)n);
}

#ifdef TESSERA_PROFILE
static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}
#endif

static int64_t replay(const int64_t *steps, int64_t first, int64_t last, const int64_t *slots,
                      const int64_t *relocs, const int64_t *bases, const int64_t *checks,
                      int64_t nchecks PROFILE_ARG) {
    int64_t buf[MAX_SLOTS];
    for (int64_t i = first; i < last; i++) {
        const int64_t *s = steps + 8 * i;
        memcpy(buf, slots + s[4], (size_t)s[5] * 8);
        for (int64_t r = s[6]; r < s[6] + s[7]; r++) {
            const int64_t *rel = relocs + 3 * r;
            buf[rel[0]] = bases[rel[1]] + rel[2];
        }
#ifdef TESSERA_PROFILE
        times[2 * (i - first)] = now_ns();
#endif
        if (s[1] > 0 && s[2] > 0 && s[3] > 0)
            ((entry_fn)(intptr_t)s[0])(s[1], s[2], s[3], (const char *)buf);
#ifdef TESSERA_PROFILE
        times[2 * (i - first) + 1] = now_ns();
#endif
    }
    for (int64_t c = 0; c < nchecks; c++) {
        int64_t word;
        memcpy(&word, (const char *)(intptr_t)(bases[checks[2 * c]] + checks[2 * c + 1]), 8);
        if (word) return c;
    }
    return -1;
}

static PyObject *run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != NARGS) {
        PyErr_SetString(PyExc_TypeError, NARGS == 8 ?
                        "run(steps, first, last, slots, relocs, bases, checks, nchecks)" :
                        "run(steps, first, last, slots, relocs, bases, checks, nchecks, times)");
        return NULL;
    }
    int64_t a[NARGS];
    for (int i = 0; i < NARGS; i++) {
        a[i] = PyLong_AsLongLong(args[i]);
        if (a[i] == -1 && PyErr_Occurred()) return NULL;
    }
    int64_t failed;
    Py_BEGIN_ALLOW_THREADS
    failed = replay((const int64_t *)(intptr_t)a[0], a[1], a[2], (const int64_t *)(intptr_t)a[3],
                    (const int64_t *)(intptr_t)a[4], (const int64_t *)(intptr_t)a[5],
                    (const int64_t *)(intptr_t)a[6], a[7]
#ifdef TESSERA_PROFILE
                    , (int64_t *)(intptr_t)a[8]
#endif
                    );
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong(failed);
}

static PyObject *builtins(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return Py_BuildValue("{s:K}", "memset", (unsigned long long)(uintptr_t)tsr_memset);
}

static PyMethodDef methods[] = {
    {"run", (PyCFunction)(void (*)(void))run, METH_FASTCALL,
     "run(steps, first, last, slots, relocs, bases, checks, nchecks): replay launches"},
    {"builtins", builtins, METH_NOARGS, "addresses of the builtin entry points"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, MODULE_NAME, NULL, -1, methods};

#ifdef TESSERA_PROFILE
PyMODINIT_FUNC PyInit__tsr_replay_prof(void) { return PyModule_Create(&module); }
#else
PyMODINIT_FUNC PyInit__tsr_replay(void) { return PyModule_Create(&module); }
#endif
