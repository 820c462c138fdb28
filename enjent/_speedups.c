/*
 * enjent._speedups: the optional C helper for frame masking (RFC 6455 §5.3).
 *
 * Protocol core (layer 1). enjent/mask.py imports apply_mask() from here when
 * the extension was built and otherwise uses its pure-Python fallback; both
 * must return the same bytes (tests/test_mask.py checks it).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define MASK_SIZE 4

/*
 * XOR `length` bytes of `src` with the repeated 4-byte `mask` into `dst`.
 * Eight bytes at a time through a uint64_t; memcpy keeps unaligned loads and
 * stores well defined and compiles to plain moves. Byte order does not matter:
 * the word is loaded and stored in the same order and the mask repeats every
 * four bytes, so each 8-byte block starts at mask phase 0.
 */
static void
mask_bytes(unsigned char *dst, const unsigned char *src, Py_ssize_t length,
           const unsigned char *mask)
{
    unsigned char mask_block[8];
    uint64_t mask_word;
    uint64_t word;
    Py_ssize_t i = 0;

    memcpy(mask_block, mask, MASK_SIZE);
    memcpy(mask_block + MASK_SIZE, mask, MASK_SIZE);
    memcpy(&mask_word, mask_block, sizeof(mask_word));

    for (; i + 8 <= length; i += 8) {
        memcpy(&word, src + i, sizeof(word));
        word ^= mask_word;
        memcpy(dst + i, &word, sizeof(word));
    }
    for (; i < length; i++) {
        dst[i] = src[i] ^ mask[i & (MASK_SIZE - 1)];
    }
}

PyDoc_STRVAR(apply_mask_doc,
"apply_mask($module, data, mask, /)\n"
"--\n"
"\n"
"Return ``data`` XORed with the repeated 4-byte ``mask`` (RFC 6455 §5.3).\n"
"\n"
"``data`` is any C-contiguous bytes-like object; ``mask`` is a bytes-like\n"
"object of exactly 4 bytes (ValueError otherwise). Masking twice with the\n"
"same key gives the original bytes back.");

static PyObject *
apply_mask(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer data;
    Py_buffer mask;
    PyObject *result = NULL;

    (void)module;
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError,
                     "apply_mask() takes exactly 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &mask, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if (mask.len != MASK_SIZE) {
        PyErr_Format(PyExc_ValueError,
                     "mask must be exactly 4 bytes, got %zd", mask.len);
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, data.len);
    if (result == NULL) {
        goto done;
    }
    mask_bytes((unsigned char *)PyBytes_AS_STRING(result),
               (const unsigned char *)data.buf, data.len,
               (const unsigned char *)mask.buf);

done:
    PyBuffer_Release(&mask);
    PyBuffer_Release(&data);
    return result;
}

PyDoc_STRVAR(unmask_frame_doc,
"unmask_frame($module, data, start, stop, /)\n"
"--\n"
"\n"
"Return ``data[start:stop]`` XORed with the 4-byte key ``data[start - 4:start]``\n"
"(a frame's masking key comes just before its payload, RFC 6455 §5.2).\n"
"\n"
"The same bytes as ``apply_mask(data[start:stop], data[start - 4:start])``,\n"
"without making the two slices. ValueError when ``4 <= start <= stop <=\n"
"len(data)`` does not hold.");

static PyObject *
unmask_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer data;
    Py_ssize_t start;
    Py_ssize_t stop;
    PyObject *result = NULL;

    (void)module;
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError,
                     "unmask_frame() takes exactly 3 arguments (%zd given)", nargs);
        return NULL;
    }
    start = PyLong_AsSsize_t(args[1]);
    if (start == -1 && PyErr_Occurred()) {
        return NULL;
    }
    stop = PyLong_AsSsize_t(args[2]);
    if (stop == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (start < MASK_SIZE || stop < start || stop > data.len) {
        PyErr_Format(PyExc_ValueError,
                     "need 4 <= start <= stop <= len(data), got start=%zd stop=%zd len=%zd",
                     start, stop, data.len);
        goto done;
    }
    result = PyBytes_FromStringAndSize(NULL, stop - start);
    if (result == NULL) {
        goto done;
    }
    mask_bytes((unsigned char *)PyBytes_AS_STRING(result),
               (const unsigned char *)data.buf + start, stop - start,
               (const unsigned char *)data.buf + start - MASK_SIZE);

done:
    PyBuffer_Release(&data);
    return result;
}

static PyMethodDef speedups_methods[] = {
    {"apply_mask", (PyCFunction)(void (*)(void))apply_mask, METH_FASTCALL,
     apply_mask_doc},
    {"unmask_frame", (PyCFunction)(void (*)(void))unmask_frame, METH_FASTCALL,
     unmask_frame_doc},
    {NULL, NULL, 0, NULL},
};

/* The module holds no state, so it is safe in every interpreter. */
static PyModuleDef_Slot speedups_slots[] = {
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "enjent._speedups",
    .m_doc = "Optional C helpers for enjent (RFC 6455 §5.3 frame masking).",
    .m_size = 0,
    .m_methods = speedups_methods,
    .m_slots = speedups_slots,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
