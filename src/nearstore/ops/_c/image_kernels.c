/*
 * nearstore.ops._image: per-pixel image kernels that numpy would run as several passes.
 *
 * lut_planes(src, lut, out): out[c, y, x] = lut[c, src[c, y, x]] for a 3-D uint8 array src of any
 * strides (a flipped or transposed view too), a C-contiguous float32 table lut of shape (C, 256) and
 * a C-contiguous float32 out of src's shape. One pass over the output instead of a cast and two
 * arithmetic passes; with a table computed by the same float32 operations, the bits are the same.
 * The GIL is released while it runs.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static int is_format(const Py_buffer *b, const char *want) {
    const char *f = b->format ? b->format : "B";
    if (f[0] == '<' || f[0] == '=' || f[0] == '@') f++;
    return strcmp(f, want) == 0;
}

static PyObject *lut_planes(PyObject *self, PyObject *args) {
    PyObject *src_o, *lut_o, *out_o;
    if (!PyArg_ParseTuple(args, "OOO", &src_o, &lut_o, &out_o)) return NULL;
    Py_buffer src, lut, out;
    if (PyObject_GetBuffer(src_o, &src, PyBUF_RECORDS_RO) < 0) return NULL;
    if (PyObject_GetBuffer(lut_o, &lut, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    if (PyObject_GetBuffer(out_o, &out, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&lut);
        return NULL;
    }
    const char *problem = NULL;
    if (src.ndim != 3 || src.itemsize != 1 || !(is_format(&src, "B") || is_format(&src, "b"))) {
        problem = "src must be a 3-D uint8 array";
    } else if (lut.ndim != 2 || lut.shape[1] != 256 || lut.shape[0] != src.shape[0] || !is_format(&lut, "f")) {
        problem = "lut must be a C-contiguous float32 array of shape (channels, 256)";
    } else if (out.ndim != 3 || !is_format(&out, "f") || out.shape[0] != src.shape[0] ||
               out.shape[1] != src.shape[1] || out.shape[2] != src.shape[2]) {
        problem = "out must be a C-contiguous float32 array of src's shape";
    }
    if (problem) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&lut);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, problem);
        return NULL;
    }
    const Py_ssize_t C = src.shape[0], H = src.shape[1], W = src.shape[2];
    const Py_ssize_t sc = src.strides[0], sy = src.strides[1], sx = src.strides[2];
    const unsigned char *base = (const unsigned char *)src.buf;
    const float *table = (const float *)lut.buf;
    float *dst = (float *)out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t c = 0; c < C; c++) {
        const float *t = table + 256 * c;
        for (Py_ssize_t y = 0; y < H; y++) {
            const unsigned char *p = base + c * sc + y * sy;
            float *o = dst + (c * H + y) * W;
            if (sx == 1) {
                for (Py_ssize_t x = 0; x < W; x++) o[x] = t[p[x]];
            } else {
                for (Py_ssize_t x = 0; x < W; x++) o[x] = t[p[x * sx]];
            }
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&lut);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"lut_planes", lut_planes, METH_VARARGS,
     "lut_planes(src, lut, out): out[c, y, x] = lut[c, src[c, y, x]] (uint8 src of any strides, float32 lut "
     "(C, 256), C-contiguous float32 out)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_image", NULL, -1, methods};

PyMODINIT_FUNC PyInit__image(void) { return PyModule_Create(&module); }
