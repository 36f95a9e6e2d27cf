/*
 * nearstore.ops._jpeg: region + DCT-scaled JPEG decoding on libjpeg-turbo.
 *
 * One function, decode_region(data, scale_num, x, y, w, h) -> (bytearray, out_w, out_h, x_skip):
 * decodes rows [y, y+h) and at least columns [x, x+w) of the image scaled by
 * scale_num/8 (libjpeg-turbo's DCT scaling), using jpeg_crop_scanline and
 * jpeg_skip_scanlines so pixels outside the region are not reconstructed.
 * The returned buffer is out_h rows of out_w RGB pixels; the wanted columns
 * start at x_skip (crop_scanline aligns the left edge to an iMCU boundary).
 * With a keep window (kx, ky, kw, kh inside the region, in image coordinates)
 * only that window is stored, as kh tight rows of kw pixels (x_skip 0): the
 * rows around it are decoded into a small scratch buffer and dropped, so a
 * caller that decodes a margin around what it needs gets a contiguous array.
 * CMYK and YCCK JPEGs (libjpeg-turbo has no conversion from them to RGB) are
 * decoded to CMYK and converted here exactly as Pillow does: Adobe's inverted
 * polarity ("CMYK;I"), then R = (255-K') - (255-C')(255-K')/255 with Pillow's
 * rounding, where C', K' are the stored values (tested pixel for pixel).
 * Also header(data) -> (width, height). The GIL is released while decoding.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} err_mgr;

static void on_error(j_common_ptr cinfo) {
    err_mgr *err = (err_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    /* Warnings (corrupt data recovered by libjpeg) become errors: a silently wrong sample is worse. */
    if (level < 0) {
        err_mgr *err = (err_mgr *)cinfo->err;
        if (cinfo->err->num_warnings == 0) {
            (*cinfo->err->format_message)(cinfo, err->message);
        }
        cinfo->err->num_warnings++;
    }
}

static PyObject *DecodeError;

/* Pillow's cmyk2rgb on Adobe-inverted samples: c = 255 - stored, nk = 255 - k = stored k. */
static void cmyk_rows_to_rgb(const unsigned char *src, unsigned char *dst, size_t pixels) {
    size_t i;
    for (i = 0; i < pixels; i++) {
        int nk = src[4 * i + 3];
        int ch;
        for (ch = 0; ch < 3; ch++) {
            int c = 255 - src[4 * i + ch];
            int t = c * nk + 128;
            int v = nk - (((t >> 8) + t) >> 8);
            dst[3 * i + ch] = (unsigned char)(v < 0 ? 0 : v > 255 ? 255 : v);
        }
    }
}

static PyObject *header(PyObject *self, PyObject *args) {
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "y*", &buf)) return NULL;
    struct jpeg_decompress_struct cinfo;
    err_mgr err;
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.message[0] = 0;
    if (setjmp(err.jump)) {
        jpeg_destroy_decompress(&cinfo);
        PyBuffer_Release(&buf);
        PyErr_Format(DecodeError, "not a decodable JPEG: %s", err.message);
        return NULL;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, (const unsigned char *)buf.buf, (unsigned long)buf.len);
    jpeg_read_header(&cinfo, TRUE);
    int w = (int)cinfo.image_width, h = (int)cinfo.image_height;
    jpeg_destroy_decompress(&cinfo);
    PyBuffer_Release(&buf);
    return Py_BuildValue("(ii)", w, h);
}

static PyObject *decode_region(PyObject *self, PyObject *args) {
    Py_buffer buf;
    int scale_num, x, y, w, h, fast = 0, kx = -1, ky = -1, kw = -1, kh = -1;
    if (!PyArg_ParseTuple(args, "y*iiiii|piiii", &buf, &scale_num, &x, &y, &w, &h, &fast, &kx, &ky, &kw, &kh))
        return NULL;
    int keep = kx >= 0;
    if (!keep) {
        kx = x, ky = y, kw = w, kh = h;
    } else if (ky < y || kx < x || kw < 1 || kh < 1 || kx + kw > x + w || ky + kh > y + h) {
        PyBuffer_Release(&buf);
        PyErr_Format(PyExc_ValueError, "keep window x=%d y=%d w=%d h=%d lies outside the region x=%d y=%d w=%d h=%d",
                     kx, ky, kw, kh, x, y, w, h);
        return NULL;
    }
    if (scale_num < 1 || scale_num > 16) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "scale_num must be in 1..16");
        return NULL;
    }
    struct jpeg_decompress_struct cinfo;
    err_mgr err;
    /* volatile: set after setjmp and read after a longjmp from libjpeg's error handler */
    PyObject *volatile out = NULL;
    unsigned char *volatile dst = NULL;
    unsigned char *volatile four = NULL; /* 32 decoded rows: CMYK before conversion, or around a keep window */
    const char *volatile problem = NULL;
    JDIMENSION out_w = 0, xoff = 0;
    int warnings = 0;

    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.message[0] = 0;
    Py_BEGIN_ALLOW_THREADS
    if (setjmp(err.jump)) {
        problem = "decode";
    } else {
        jpeg_create_decompress(&cinfo);
        jpeg_mem_src(&cinfo, (const unsigned char *)buf.buf, (unsigned long)buf.len);
        jpeg_read_header(&cinfo, TRUE);
        int cmyk = cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK;
        cinfo.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
        cinfo.scale_num = (unsigned int)scale_num;
        cinfo.scale_denom = 8;
        cinfo.dct_method = fast ? JDCT_IFAST : JDCT_ISLOW;
        cinfo.do_fancy_upsampling = fast ? FALSE : TRUE;
        jpeg_start_decompress(&cinfo);
        if (x < 0 || y < 0 || w < 1 || h < 1 || (JDIMENSION)(x + w) > cinfo.output_width ||
            (JDIMENSION)(y + h) > cinfo.output_height) {
            problem = "region";
        } else {
            xoff = (JDIMENSION)x;
            out_w = (JDIMENSION)w;
            if (xoff > 0 || out_w < cinfo.output_width) {
                jpeg_crop_scanline(&cinfo, &xoff, &out_w);
            }
            size_t row = (size_t)out_w * 3;
            /* whole rows: decode straight into the bytearray we return (no copy afterwards); a keep window:
               through a 32-row scratch buffer, copying out the window. Allocate the bytearray with the GIL */
            size_t out_row = keep ? (size_t)kw * 3 : row;
            size_t col = keep ? (size_t)(kx - (int)xoff) : 0; /* first kept column within a decoded row */
            Py_BLOCK_THREADS
            out = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(out_row * (size_t)(keep ? kh : h)));
            if (!out) PyErr_Clear();
            Py_UNBLOCK_THREADS
            if (out && (cmyk || keep)) { /* CMYK rows before conversion, or rows around a keep window */
                four = (unsigned char *)malloc((size_t)out_w * (cmyk ? 4 : 3) * 32);
            }
            if (!out || ((cmyk || keep) && !four)) {
                problem = "memory";
            } else {
                size_t px = cmyk ? 4 : 3; /* bytes per decoded pixel */
                dst = (unsigned char *)PyByteArray_AS_STRING(out);
                if (y > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)y);
                JSAMPROW rows[32];
                while (cinfo.output_scanline < (JDIMENSION)(y + h)) {
                    JDIMENSION done = cinfo.output_scanline - (JDIMENSION)y;
                    JDIMENSION left = (JDIMENSION)h - done, k, got;
                    if (left > 32) left = 32;
                    for (k = 0; k < left; k++)
                        rows[k] = (cmyk || keep) ? four + (size_t)out_w * px * k : dst + row * (done + k);
                    got = jpeg_read_scanlines(&cinfo, rows, left);
                    if (got == 0) break;
                    if (!keep) {
                        if (cmyk) cmyk_rows_to_rgb(four, dst + row * done, (size_t)out_w * got);
                        continue;
                    }
                    for (k = 0; k < got; k++) {
                        int r = y + (int)(done + k); /* image row */
                        if (r < ky || r >= ky + kh) continue;
                        unsigned char *to = dst + out_row * (size_t)(r - ky);
                        const unsigned char *from = four + (size_t)out_w * px * k;
                        if (cmyk) {
                            cmyk_rows_to_rgb(from + col * 4, to, (size_t)kw);
                        } else {
                            memcpy(to, from + col * 3, out_row);
                        }
                    }
                }
                warnings = (int)err.pub.num_warnings;
                if (keep) out_w = (JDIMENSION)kw, xoff = (JDIMENSION)kx;
            }
        }
        jpeg_abort_decompress(&cinfo);
    }
    jpeg_destroy_decompress(&cinfo);
    free(four);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);

    if (problem == NULL && warnings > 0) problem = "corrupt";
    if (problem != NULL) {
        Py_XDECREF(out);
        if (strcmp(problem, "region") == 0) {
            PyErr_Format(PyExc_ValueError, "region x=%d y=%d w=%d h=%d lies outside the scaled image", x, y, w, h);
        } else if (strcmp(problem, "memory") == 0) {
            PyErr_NoMemory();
        } else {
            PyErr_Format(DecodeError, "corrupt JPEG: %s", err.message[0] ? err.message : "unknown error");
        }
        return NULL;
    }
    return Py_BuildValue("(Niii)", out, (int)out_w, keep ? kh : h, keep ? 0 : x - (int)xoff);
}

static PyMethodDef methods[] = {
    {"header", header, METH_VARARGS, "header(data) -> (width, height)"},
    {"decode_region", decode_region, METH_VARARGS,
     "decode_region(data, scale_num, x, y, w, h, fast=False, kx=-1, ky=-1, kw=-1, kh=-1) -> "
     "(rgb_bytearray, out_w, out_h, x_skip)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg", NULL, -1, methods};

PyMODINIT_FUNC PyInit__jpeg(void) {
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    DecodeError = PyErr_NewException("nearstore.ops._jpeg.DecodeError", PyExc_ValueError, NULL);
    Py_INCREF(DecodeError);
    PyModule_AddObject(m, "DecodeError", DecodeError);
    return m;
}
