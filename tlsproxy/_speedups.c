/*
 * C versions of tlsproxy's per-request pure functions.
 *
 * Each function here is a line-for-line port of a pure Python function,
 * which stays the specification:
 *
 *   parse_request_head     tlsproxy.http.wire.py_parse_request_head
 *   parse_response_head    tlsproxy.http.wire.py_parse_response_head
 *   response_block         tlsproxy.proxy.headers.py_response_block
 *   upstream_request_head  tlsproxy.proxy.headers.py_upstream_request_head
 *   HpackDecoder           hpack.Decoder (the hpack library's, raw bytes)
 *   h2_request_head        tlsproxy.http.h2.py_parse_request, for the requests it passes
 *
 * and tests/unit/test_speedups.py checks that both give the same result, or
 * raise the same error, for generated and mutated inputs (tests/unit/test_hpack.py
 * for the decoder).  Nothing here keeps state between calls but the types handed
 * over by configure() and configure_hpack(), and each HpackDecoder's own table.
 *
 * Every scan is bounded by the length of the Python bytes object it reads;
 * output sizes are computed before anything is written.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

static PyObject *RequestHead = NULL;
/* Where RequestHead's eight slots live in an instance, when it is the plain
   slotted dataclass wire.py defines (its __init__ only stores its arguments):
   a head is then made without running Python code.  Zero: call the class. */
static Py_ssize_t head_offsets[8];
static int head_direct = 0;
static PyObject *RequestError = NULL;
static PyObject *ResponseError = NULL;

/* ------------------------------------------------------------ byte classes */

static unsigned char TCHAR[256];   /* token characters (RFC 9110 5.6.2) */
static unsigned char FIELDCH[256]; /* field content: VCHAR, obs-text, SP, HTAB */
static unsigned char TARGETCH[256]; /* request-target: VCHAR, obs-text */
static unsigned char HOSTCH[256];  /* what a Host value may hold */

static void
init_tables(void)
{
    const char *tspecial = "!#$%&'*+-.^_`|~";
    const char *host_delims = "/\\?#@\"<>{}|^`";
    for (int c = 0; c < 256; c++) {
        TCHAR[c] = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                   (c != 0 && strchr(tspecial, c) != NULL);
        FIELDCH[c] = (c >= 0x21 && c <= 0x7e) || c >= 0x80 || c == ' ' || c == '\t';
        TARGETCH[c] = (c >= 0x21 && c <= 0x7e) || c >= 0x80;
        HOSTCH[c] = (c >= 0x21 && c <= 0x7e) && strchr(host_delims, c) == NULL;
    }
}

static inline int
is_ows(char c)
{
    return c == ' ' || c == '\t';
}

/* What Python's bytes.strip() takes off: ASCII whitespace.  Each caller
   mirrors a .strip() in the Python versions (Connection tokens, cookie
   attributes, Content-Length parts), and header lists handed to
   upstream_request_head may hold any bytes. */
static inline int
is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static void
strip_ows(const char **start, const char **end)
{
    while (*start < *end && is_space(**start))
        (*start)++;
    while (*end > *start && is_space((*end)[-1]))
        (*end)--;
}

static inline char
lower(char c)
{
    return (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
}

/* Case-insensitive comparison of [s, s+n) with a lower-case literal. */
static int
eq_lower_n(const char *s, Py_ssize_t n, const char *lit, Py_ssize_t m)
{
    if (n != m)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (lower(s[i]) != lit[i])
            return 0;
    return 1;
}
#define eq_lower(s, n, lit) eq_lower_n((s), (n), (lit), (Py_ssize_t)sizeof(lit) - 1)

/* Exact comparison with a literal. */
#define eq(s, n, lit) ((n) == (Py_ssize_t)sizeof(lit) - 1 && memcmp((s), (lit), sizeof(lit) - 1) == 0)

typedef struct {
    const char *name;
    Py_ssize_t len;
} name_t;
#define NAME_T(lit) {lit, (Py_ssize_t)sizeof(lit) - 1}

static int
in_list(const char *s, Py_ssize_t n, const name_t *names)
{
    for (; names->name != NULL; names++)
        if (names->len == n && memcmp(s, names->name, (size_t)n) == 0)
            return 1;
    return 0;
}

static const name_t HOP_BY_HOP[] = {
    NAME_T("connection"), NAME_T("keep-alive"), NAME_T("proxy-connection"),
    NAME_T("te"), NAME_T("trailer"), NAME_T("transfer-encoding"),
    NAME_T("upgrade"), NAME_T("content-length"), NAME_T("expect"), {NULL, 0},
};
static const name_t FORWARDING[] = {
    NAME_T("x-forwarded-for"), NAME_T("x-forwarded-proto"), NAME_T("x-forwarded-host"),
    NAME_T("x-forwarded-port"), NAME_T("x-forwarded-protocol"), NAME_T("x-forwarded-ssl"),
    NAME_T("x-forwarded-scheme"), NAME_T("x-url-scheme"), NAME_T("x-real-ip"),
    NAME_T("front-end-https"), NAME_T("forwarded"), {NULL, 0},
};
static const name_t PROTECTED_EXTRA[] = {
    NAME_T("host"), NAME_T("content-type"), NAME_T("cookie"), NAME_T("authorization"), {NULL, 0},
};

/* name.replace(b"_", b"-") in names, for a name holding an underscore. */
static int
underscore_spelling_in(const char *s, Py_ssize_t n, const name_t *names)
{
    int has = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (s[i] == '_')
            has = 1;
    if (!has)
        return 0;
    for (const name_t *f = names; f->name != NULL; f++) {
        if (f->len != n)
            continue;
        Py_ssize_t i = 0;
        for (; i < n; i++) {
            char c = s[i] == '_' ? '-' : s[i];
            if (c != f->name[i])
                break;
        }
        if (i == n)
            return 1;
    }
    return 0;
}

/* ------------------------------------------------------------ field lines */

typedef struct {
    const char *name;
    Py_ssize_t name_len;
    const char *value; /* without the OWS around it */
    Py_ssize_t value_len;
} field_t;

/* One field line at p: token ":" field content CRLF.  Returns the position
   after its CRLF, or NULL if the line does not match the grammar. */
static const char *
parse_field(const char *p, const char *end, field_t *f)
{
    const char *s = p;
    while (p < end && TCHAR[(unsigned char)*p])
        p++;
    if (p == s || p >= end || *p != ':')
        return NULL;
    f->name = s;
    f->name_len = p - s;
    p++;
    while (p < end && is_ows(*p))
        p++;
    const char *v = p;
    while (p < end && FIELDCH[(unsigned char)*p])
        p++;
    const char *ve = p;
    while (ve > v && is_ows(ve[-1]))
        ve--;
    if (end - p < 2 || p[0] != '\r' || p[1] != '\n')
        return NULL;
    f->value = v;
    f->value_len = ve - v;
    return p + 2;
}

/* The field lines of a block, parsed once.  Up to SMALL_FIELDS live in the
   struct; more move to the heap. */
#define SMALL_FIELDS 48
typedef struct {
    field_t *items;
    Py_ssize_t count, cap;
    field_t small[SMALL_FIELDS];
} fields_t;

static void
fields_free(fields_t *fs)
{
    if (fs->items != fs->small)
        PyMem_Free(fs->items);
}

/* Parse [p, end) into fs.  Returns 1, 0 if a line does not match the
   grammar, or -1 with an exception set (no memory).  fs is always left in
   a state fields_free() accepts. */
static int
parse_fields(const char *p, const char *end, fields_t *fs)
{
    fs->items = fs->small;
    fs->count = 0;
    fs->cap = SMALL_FIELDS;
    while (p < end) {
        if (fs->count == fs->cap) {
            Py_ssize_t cap = fs->cap * 4;
            field_t *bigger = PyMem_Malloc(sizeof(field_t) * (size_t)cap);
            if (bigger == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            memcpy(bigger, fs->items, sizeof(field_t) * (size_t)fs->count);
            fields_free(fs);
            fs->items = bigger;
            fs->cap = cap;
        }
        p = parse_field(p, end, &fs->items[fs->count]);
        if (p == NULL)
            return 0;
        fs->count++;
    }
    return 1;
}

/* A list of (lower-case name, value) tuples for the fields. */
static PyObject *
fields_list(const fields_t *fs)
{
    PyObject *list = PyList_New(fs->count);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < fs->count; i++) {
        const field_t *f = &fs->items[i];
        PyObject *name = PyBytes_FromStringAndSize(NULL, f->name_len);
        if (name == NULL)
            goto fail;
        char *out = PyBytes_AS_STRING(name);
        for (Py_ssize_t k = 0; k < f->name_len; k++)
            out[k] = lower(f->name[k]);
        PyObject *value = PyBytes_FromStringAndSize(f->value, f->value_len);
        if (value == NULL) {
            Py_DECREF(name);
            goto fail;
        }
        PyObject *pair = PyTuple_New(2);
        if (pair == NULL) {
            Py_DECREF(name);
            Py_DECREF(value);
            goto fail;
        }
        PyTuple_SET_ITEM(pair, 0, name);
        PyTuple_SET_ITEM(pair, 1, value);
        PyList_SET_ITEM(list, i, pair);
    }
    return list;
fail:
    Py_DECREF(list);
    return NULL;
}

/* Calls fn(token start, token length, arg) for each comma-separated token
   of a Connection value, OWS stripped (empty tokens included, as Python's
   split does). */
typedef void (*token_fn)(const char *, Py_ssize_t, void *);

static void
each_token(const char *v, Py_ssize_t n, token_fn fn, void *arg)
{
    const char *end = v + n;
    const char *s = v;
    for (const char *p = v;; p++) {
        if (p == end || *p == ',') {
            const char *a = s, *b = p;
            strip_ows(&a, &b);
            fn(a, b - a, arg);
            if (p == end)
                break;
            s = p + 1;
        }
    }
}

typedef struct {
    int close, keep_alive, upgrade;
} conn_flags;

static void
flag_token(const char *t, Py_ssize_t n, void *arg)
{
    conn_flags *flags = (conn_flags *)arg;
    if (eq_lower(t, n, "close"))
        flags->close = 1;
    else if (eq_lower(t, n, "keep-alive"))
        flags->keep_alive = 1;
    else if (eq_lower(t, n, "upgrade"))
        flags->upgrade = 1;
}

/* ------------------------------------------------------------ errors */

static PyObject *
request_error(int status, const char *detail)
{
    PyObject *exc = PyObject_CallFunction(RequestError, "is", status, detail);
    if (exc != NULL) {
        PyErr_SetObject(RequestError, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static PyObject *
response_error(const char *detail)
{
    PyErr_SetString(ResponseError, detail);
    return NULL;
}

static const char *const HEAD_FIELDS[8] = {
    "method", "target", "version", "host", "headers", "content_length", "chunked", "upgrade",
};

/* Find the slot offsets of RequestHead, or leave head_direct off. */
static void
find_head_slots(void)
{
    head_direct = 0;
    if (!PyType_Check(RequestHead))
        return;
    PyTypeObject *type = (PyTypeObject *)RequestHead;
    PyObject *slots = PyObject_GetAttrString(RequestHead, "__slots__");
    if (slots == NULL) {
        PyErr_Clear();
        return;
    }
    int ok = PyTuple_Check(slots) && PyTuple_GET_SIZE(slots) == 8 && type->tp_base == &PyBaseObject_Type;
    for (int i = 0; ok && i < 8; i++) {
        PyObject *name = PyTuple_GET_ITEM(slots, i);
        ok = PyUnicode_Check(name) && PyUnicode_CompareWithASCIIString(name, HEAD_FIELDS[i]) == 0;
        if (!ok)
            break;
        PyObject *descr = PyDict_GetItemString(type->tp_dict, HEAD_FIELDS[i]); /* borrowed */
        ok = descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type) &&
             ((PyMemberDescrObject *)descr)->d_member->type == T_OBJECT_EX;
        if (ok)
            head_offsets[i] = ((PyMemberDescrObject *)descr)->d_member->offset;
    }
    Py_DECREF(slots);
    head_direct = ok;
}

/* A RequestHead of the eight values (references are not stolen). */
static PyObject *
make_request_head(PyObject *const *items)
{
    if (!head_direct)
        return PyObject_Vectorcall(RequestHead, items, 8, NULL);
    PyTypeObject *type = (PyTypeObject *)RequestHead;
    PyObject *head = type->tp_alloc(type, 0);
    if (head == NULL)
        return NULL;
    for (int i = 0; i < 8; i++)
        *(PyObject **)((char *)head + head_offsets[i]) = Py_NewRef(items[i]);
    return head;
}

static int
configured(void)
{
    if (RequestHead == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "tlsproxy._speedups.configure() was not called");
        return 0;
    }
    return 1;
}

/* The reason wire._why_malformed gives for a head that fails the grammar. */
static const char *
why_malformed(const char *h, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (h[i] == '\n' && (i == 0 || h[i - 1] != '\r'))
            return "bare LF in the request head";
    for (Py_ssize_t i = 0; i < n; i++)
        if (h[i] == '\r' && (i + 1 == n || h[i + 1] != '\n'))
            return "bare CR in the request head";
    for (Py_ssize_t i = 0; i + 1 < n; i++)
        if (h[i] == '\n' && is_ows(h[i + 1]))
            return "obs-fold (a folded header line)";
    /* The request line must look like \S+ \S+ HTTP/\S+ */
    Py_ssize_t end = 0;
    while (end + 1 < n && !(h[end] == '\r' && h[end + 1] == '\n'))
        end++;
    if (end + 1 >= n)
        end = n;
#define NOT_SPACE(c) (!((c) == ' ' || (c) == '\t' || (c) == '\n' || (c) == '\r' || (c) == '\f' || (c) == '\v'))
    Py_ssize_t i = 0, s;
    s = i;
    while (i < end && NOT_SPACE(h[i]))
        i++;
    if (i == s || i >= end || h[i] != ' ')
        return "malformed request line";
    i++;
    s = i;
    while (i < end && NOT_SPACE(h[i]))
        i++;
    if (i == s || i >= end || h[i] != ' ')
        return "malformed request line";
    i++;
    if (end - i < 6 || memcmp(h + i, "HTTP/", 5) != 0)
        return "malformed request line";
    for (i += 5; i < end; i++)
        if (!NOT_SPACE(h[i]))
            return "malformed request line";
#undef NOT_SPACE
    return "malformed header field";
}

/* ------------------------------------------------------------ request head */

static PyObject *
request_head(const char *h, Py_ssize_t n, Py_ssize_t max_count, fields_t *fs)
{
    const char *end = h + n, *p = h;

    /* request-line = method SP request-target SP HTTP-version CRLF */
    const char *method = p;
    while (p < end && TCHAR[(unsigned char)*p])
        p++;
    Py_ssize_t method_len = p - method;
    if (method_len == 0 || p >= end || *p != ' ')
        return request_error(400, why_malformed(h, n));
    p++;
    const char *target = p;
    while (p < end && TARGETCH[(unsigned char)*p])
        p++;
    Py_ssize_t target_len = p - target;
    if (target_len == 0 || end - p < 11 || memcmp(p, " HTTP/", 6) != 0)
        return request_error(400, why_malformed(h, n));
    p += 6;
    char major = p[0], minor = p[2];
    if (!(major >= '0' && major <= '9') || p[1] != '.' || !(minor >= '0' && minor <= '9') || p[3] != '\r' ||
        p[4] != '\n')
        return request_error(400, why_malformed(h, n));
    p += 5;
    const char *block = p;
    int parsed = parse_fields(block, end, fs);
    if (parsed < 0)
        return NULL;
    if (parsed == 0)
        return request_error(400, why_malformed(h, n));
    Py_ssize_t count = fs->count;
    if (major != '1' || (minor != '0' && minor != '1'))
        return request_error(505, "only HTTP/1.0 and HTTP/1.1 are spoken here");
    int v11 = minor == '1';
    if (count > max_count)
        return request_error(431, "too many header fields");

    /* The fields the parser itself looks at, in order. */
    const char *host = NULL;
    Py_ssize_t host_len = 0;
    long long content_length = -1;
    int chunked = 0;
    conn_flags flags = {0, 0, 0};
    const char *upgrade = NULL;
    Py_ssize_t upgrade_len = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        field_t f = fs->items[i];
        if (eq_lower(f.name, f.name_len, "host")) {
            if (host != NULL)
                return request_error(400, "more than one Host header");
            host = f.value;
            host_len = f.value_len;
        }
        else if (eq_lower(f.name, f.name_len, "content-length")) {
            if (content_length >= 0)
                return request_error(400, "more than one Content-Length");
            if (f.value_len == 0 || f.value_len > 18)
                return request_error(400, "malformed Content-Length");
            long long v = 0;
            for (Py_ssize_t i = 0; i < f.value_len; i++) {
                char c = f.value[i];
                if (c < '0' || c > '9')
                    return request_error(400, "malformed Content-Length");
                v = v * 10 + (c - '0');
            }
            content_length = v;
        }
        else if (eq_lower(f.name, f.name_len, "transfer-encoding")) {
            if (!v11)
                return request_error(400, "Transfer-Encoding is not allowed in HTTP/1.0");
            if (chunked)
                return request_error(400, "more than one Transfer-Encoding");
            if (!eq_lower(f.value, f.value_len, "chunked"))
                return request_error(501, "only the chunked transfer coding is supported");
            chunked = 1;
        }
        else if (eq_lower(f.name, f.name_len, "connection")) {
            each_token(f.value, f.value_len, flag_token, &flags);
        }
        else if (eq_lower(f.name, f.name_len, "upgrade")) {
            upgrade = f.value;
            upgrade_len = f.value_len;
        }
    }
    if (chunked && content_length >= 0)
        return request_error(400, "both Content-Length and Transfer-Encoding");
    if (eq(method, method_len, "CONNECT"))
        return request_error(405, "CONNECT is not supported: this is a reverse proxy");

    /* origin-form, asterisk-form (OPTIONS only) or absolute-form */
    const char *path = target;
    Py_ssize_t path_len = target_len;
    const char *authority = NULL;
    Py_ssize_t authority_len = 0;
    if (target[0] != '/') {
        if (target_len == 1 && target[0] == '*') {
            if (!eq(method, method_len, "OPTIONS"))
                return request_error(400, "the * target is only for OPTIONS");
        }
        else {
            const char *sep = NULL;
            for (Py_ssize_t i = 0; i + 3 <= target_len; i++)
                if (memcmp(target + i, "://", 3) == 0) {
                    sep = target + i;
                    break;
                }
            if (sep == NULL || !(eq_lower(target, sep - target, "http") || eq_lower(target, sep - target, "https")))
                return request_error(400, "malformed request target");
            const char *a = sep + 3, *t_end = target + target_len;
            const char *slash = a;
            while (slash < t_end && *slash != '/')
                slash++;
            if (slash == a)
                return request_error(400, "malformed request target");
            authority = a;
            authority_len = slash - a;
            if (slash < t_end) {
                path = slash;
                path_len = t_end - slash;
            }
            else {
                path = "/";
                path_len = 1;
            }
            host = authority;
            host_len = authority_len;
        }
    }
    if (host == NULL) {
        if (v11)
            return request_error(400, "HTTP/1.1 requests need a Host header");
        host = "";
        host_len = 0;
    }
    else {
        for (Py_ssize_t i = 0; i < host_len; i++)
            if (!HOSTCH[(unsigned char)host[i]])
                return request_error(400, "malformed Host header");
    }
    int keep_alive = !flags.close && (v11 || flags.keep_alive);
    if (upgrade != NULL && (upgrade_len == 0 || !v11 || !flags.upgrade || chunked || content_length > 0))
        upgrade = NULL; /* a request with a body is served as it is */
    if (upgrade != NULL && !eq_lower(upgrade, upgrade_len, "websocket"))
        upgrade = NULL; /* only WebSocket becomes a tunnel */
    if (upgrade != NULL)
        keep_alive = 0;

    /* The RequestHead */
    PyObject *headers = fields_list(fs);
    if (headers == NULL)
        return NULL;
    if (authority != NULL) {
        for (Py_ssize_t i = 0; i < count; i++) {
            PyObject *pair = PyList_GET_ITEM(headers, i);
            PyObject *name = PyTuple_GET_ITEM(pair, 0);
            if (eq(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), "host")) {
                PyObject *value = PyBytes_FromStringAndSize(authority, authority_len);
                if (value == NULL)
                    goto fail_headers;
                PyObject *fresh = PyTuple_Pack(2, name, value);
                Py_DECREF(value);
                if (fresh == NULL)
                    goto fail_headers;
                PyList_SET_ITEM(headers, i, fresh);
                Py_DECREF(pair);
            }
        }
    }
    PyObject *items[8] = {NULL};
    items[0] = PyBytes_FromStringAndSize(method, method_len);
    items[1] = PyBytes_FromStringAndSize(path, path_len);
    items[2] = PyBytes_FromString(v11 ? "1.1" : "1.0");
    items[3] = PyBytes_FromStringAndSize(NULL, host_len);
    if (items[3] != NULL) {
        char *out = PyBytes_AS_STRING(items[3]);
        for (Py_ssize_t i = 0; i < host_len; i++)
            out[i] = lower(host[i]);
    }
    items[4] = headers; /* the reference moves into items */
    headers = NULL;
    if (content_length >= 0)
        items[5] = PyLong_FromLongLong(content_length);
    else
        items[5] = Py_NewRef(Py_None);
    items[6] = Py_NewRef(chunked ? Py_True : Py_False);
    items[7] = upgrade != NULL ? PyBytes_FromStringAndSize(upgrade, upgrade_len) : PyBytes_FromString("");
    PyObject *result = NULL;
    int ok = 1;
    for (int i = 0; i < 8; i++)
        if (items[i] == NULL)
            ok = 0;
    if (ok) {
        PyObject *head = make_request_head(items);
        if (head != NULL) {
            result = PyTuple_Pack(2, head, keep_alive ? Py_True : Py_False);
            Py_DECREF(head);
        }
    }
    for (int i = 0; i < 8; i++)
        Py_XDECREF(items[i]);
    return result;
fail_headers:
    Py_DECREF(headers);
    return NULL;
}

static PyObject *
parse_request_head(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "parse_request_head(head: bytes, max_header_count: int)");
        return NULL;
    }
    if (!configured())
        return NULL;
    Py_ssize_t max_count = PyLong_AsSsize_t(args[1]);
    if (max_count == -1 && PyErr_Occurred())
        return NULL;
    fields_t fs;
    fs.items = fs.small;
    PyObject *result = request_head(PyBytes_AS_STRING(args[0]), PyBytes_GET_SIZE(args[0]), max_count, &fs);
    fields_free(&fs);
    return result;
}

/* ------------------------------------------------------------ response head */

static PyObject *
response_head(const char *h, Py_ssize_t n, fields_t *fs)
{
    const char *end = h + n, *p = h;
    static const char *malformed = "the app sent a malformed response head";

    /* HTTP/1.[01] SP 3DIGIT [SP reason] CRLF */
    if (n < 14 || memcmp(p, "HTTP/1.", 7) != 0 || (p[7] != '0' && p[7] != '1') || p[8] != ' ')
        return response_error(malformed);
    int v11 = p[7] == '1';
    p += 9;
    for (int i = 0; i < 3; i++)
        if (p[i] < '0' || p[i] > '9')
            return response_error(malformed);
    int status = (p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0');
    p += 3;
    const char *reason = "";
    Py_ssize_t reason_len = 0;
    if (p < end && *p == ' ') {
        p++;
        reason = p;
        while (p < end && FIELDCH[(unsigned char)*p])
            p++;
        reason_len = p - reason;
    }
    if (end - p < 2 || p[0] != '\r' || p[1] != '\n')
        return response_error(malformed);
    p += 2;
    const char *block = p;
    int parsed = parse_fields(block, end, fs);
    if (parsed < 0)
        return NULL;
    if (parsed == 0)
        return response_error(malformed);

    long long content_length = -1;
    int chunked = 0, coded = 0;
    conn_flags flags = {0, 0, 0};
    for (Py_ssize_t i = 0; i < fs->count; i++) {
        field_t f = fs->items[i];
        if (eq_lower(f.name, f.name_len, "content-length")) {
            /* Repeats are allowed only when they agree (RFC 9110 8.6). */
            const char *s = f.value, *v_end = f.value + f.value_len;
            for (const char *c = s;; c++) {
                if (c == v_end || *c == ',') {
                    const char *a = s, *b = c;
                    strip_ows(&a, &b);
                    if (b == a || b - a > 18)
                        return response_error("the app sent a malformed Content-Length");
                    long long v = 0;
                    for (const char *d = a; d < b; d++) {
                        if (*d < '0' || *d > '9')
                            return response_error("the app sent a malformed Content-Length");
                        v = v * 10 + (*d - '0');
                    }
                    if (content_length >= 0 && v != content_length)
                        return response_error("the app sent conflicting Content-Length values");
                    content_length = v;
                    if (c == v_end)
                        break;
                    s = c + 1;
                }
            }
        }
        else if (eq_lower(f.name, f.name_len, "transfer-encoding")) {
            coded = 1;
            const char *a = f.value, *b = f.value + f.value_len;
            const char *last = a;
            for (const char *c = a; c < b; c++)
                if (*c == ',')
                    last = c + 1;
            strip_ows(&last, &b);
            chunked = eq_lower(last, b - last, "chunked");
        }
        else if (eq_lower(f.name, f.name_len, "connection")) {
            each_token(f.value, f.value_len, flag_token, &flags);
        }
    }
    if (coded && content_length >= 0)
        return response_error("the app sent both Content-Length and Transfer-Encoding");
    int keep_alive = !flags.close && (v11 || flags.keep_alive);
    PyObject *length = content_length >= 0 ? PyLong_FromLongLong(content_length) : Py_NewRef(Py_None);
    if (length == NULL)
        return NULL;
    return Py_BuildValue("(iy#y#NOO)", status, reason, reason_len, block, (Py_ssize_t)(end - block), length,
                         chunked ? Py_True : Py_False, keep_alive ? Py_True : Py_False);
}

static PyObject *
parse_response_head(PyObject *self, PyObject *arg)
{
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "parse_response_head(head: bytes)");
        return NULL;
    }
    if (!configured())
        return NULL;
    fields_t fs;
    fs.items = fs.small;
    PyObject *result = response_head(PyBytes_AS_STRING(arg), PyBytes_GET_SIZE(arg), &fs);
    fields_free(&fs);
    return result;
}

/* ------------------------------------------------------------ header policy */

/* Connection tokens (lower case, OWS stripped, empty ones left out), kept
   as slices of a lower-cased copy of the Connection values.  Small sets
   live in the struct itself; larger ones on the heap. */
#define SMALL_TOKENS 32
typedef struct {
    char *text;      /* the lower-cased values, one after another */
    Py_ssize_t used; /* bytes of text in use */
    const char **start;
    Py_ssize_t *len;
    Py_ssize_t count, cap;
    char small_text[256];
    const char *small_start[SMALL_TOKENS];
    Py_ssize_t small_len[SMALL_TOKENS];
} tokens_t;

static void
tokens_free(tokens_t *t)
{
    if (t->text != t->small_text)
        PyMem_Free(t->text);
    if (t->start != t->small_start)
        PyMem_Free(t->start);
    if (t->len != t->small_len)
        PyMem_Free(t->len);
}

/* Room for the tokens of values whose lengths add up to total. */
static int
tokens_init(tokens_t *t, Py_ssize_t total)
{
    t->cap = total + 1; /* a token that is kept has at least one byte */
    t->used = t->count = 0;
    t->text = total < (Py_ssize_t)sizeof t->small_text ? t->small_text : PyMem_Malloc((size_t)total + 1);
    t->start = t->cap <= SMALL_TOKENS ? t->small_start : PyMem_Malloc(sizeof(char *) * (size_t)t->cap);
    t->len = t->cap <= SMALL_TOKENS ? t->small_len : PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)t->cap);
    if (t->text == NULL || t->start == NULL || t->len == NULL) {
        tokens_free(t);
        PyErr_NoMemory();
        return 0;
    }
    return 1;
}

static void
add_token(const char *s, Py_ssize_t n, void *arg)
{
    tokens_t *t = (tokens_t *)arg;
    if (n == 0 || t->count >= t->cap)
        return;
    t->start[t->count] = s;
    t->len[t->count] = n;
    t->count++;
}

static void
tokens_add_value(tokens_t *t, const char *v, Py_ssize_t n)
{
    char *copy = t->text + t->used;
    for (Py_ssize_t i = 0; i < n; i++)
        copy[i] = lower(v[i]);
    t->used += n;
    each_token(copy, n, add_token, t);
}

static int
tokens_has(const tokens_t *t, const char *s, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < t->count; i++)
        if (t->len[i] == n && memcmp(t->start[i], s, (size_t)n) == 0)
            return 1;
    return 0;
}

/* cookie_is_secure: an attribute after the first ";" that is "secure". */
static int
cookie_is_secure(const char *v, Py_ssize_t n)
{
    const char *end = v + n, *p = v;
    while (p < end && *p != ';')
        p++;
    while (p < end) {
        const char *s = ++p;
        while (p < end && *p != ';')
            p++;
        const char *a = s, *b = p;
        strip_ows(&a, &b);
        if (eq_lower(a, b - a, "secure"))
            return 1;
    }
    return 0;
}

static PyObject *
response_block(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 3 || nargs > 4 || !PyBytes_Check(args[0]) || !(args[1] == Py_None || PyBytes_Check(args[1]))) {
        PyErr_SetString(PyExc_TypeError,
                        "response_block(block: bytes, hsts: bytes | None, secure_cookies: bool, keep_upgrade=False)");
        return NULL;
    }
    int secure_cookies = PyObject_IsTrue(args[2]);
    if (secure_cookies < 0)
        return NULL;
    int keep_upgrade = 0;
    if (nargs == 4 && (keep_upgrade = PyObject_IsTrue(args[3])) < 0)
        return NULL;
    const char *block = PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    const char *end = block + n;
    const char *hsts = args[1] == Py_None ? NULL : PyBytes_AS_STRING(args[1]);
    Py_ssize_t hsts_len = hsts == NULL ? 0 : PyBytes_GET_SIZE(args[1]);

    /* Names are compared in lower case: in a lower-cased copy of the block,
       the same offsets hold each name lowered. */
    char small_lowered[2048];
    char *lowered = n < (Py_ssize_t)sizeof small_lowered ? small_lowered : PyMem_Malloc((size_t)n + 1);
    if (lowered == NULL)
        return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++)
        lowered[i] = lower(block[i]);
#define LNAME(f) (lowered + ((f).name - block))

    fields_t fs;
    int parsed = parse_fields(block, end, &fs);
    if (parsed <= 0) {
        fields_free(&fs);
        if (lowered != small_lowered)
            PyMem_Free(lowered);
        if (parsed == 0)
            PyErr_SetString(PyExc_ValueError, "response_block: the block is not field lines");
        return NULL;
    }
    Py_ssize_t conn_total = 0;
    for (Py_ssize_t i = 0; i < fs.count; i++)
        if (eq(LNAME(fs.items[i]), fs.items[i].name_len, "connection"))
            conn_total += fs.items[i].value_len;
    tokens_t named;
    if (!tokens_init(&named, conn_total)) {
        fields_free(&fs);
        if (lowered != small_lowered)
            PyMem_Free(lowered);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < fs.count; i++)
        if (eq(LNAME(fs.items[i]), fs.items[i].name_len, "connection"))
            tokens_add_value(&named, fs.items[i].value, fs.items[i].value_len);

    /* Two passes over the fields: the first sizes the output, the second writes it. */
    PyObject *result = NULL;
    char *out = NULL;
    Py_ssize_t size = 0;
    int has_hsts = 0;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1) {
            if (hsts != NULL && !has_hsts)
                size += 27 + hsts_len + 2; /* "strict-transport-security: " value CRLF */
            result = PyBytes_FromStringAndSize(NULL, size);
            if (result == NULL)
                break;
            out = PyBytes_AS_STRING(result);
        }
        for (Py_ssize_t i = 0; i < fs.count; i++) {
            field_t f = fs.items[i];
            const char *name = LNAME(f);
            Py_ssize_t name_len = f.name_len;
            int secure_add = 0;
            if (in_list(name, name_len, HOP_BY_HOP) || tokens_has(&named, name, name_len)) {
                if (!(keep_upgrade && (eq(name, name_len, "upgrade") || eq(name, name_len, "connection"))))
                    continue;
            }
            else if (eq(name, name_len, "strict-transport-security")) {
                has_hsts = 1;
            }
            else if (secure_cookies && eq(name, name_len, "set-cookie") && !cookie_is_secure(f.value, f.value_len)) {
                secure_add = 1;
            }
            if (pass == 0) {
                size += name_len + 2 + f.value_len + (secure_add ? 8 : 0) + 2;
                continue;
            }
            memcpy(out, name, (size_t)name_len);
            out += name_len;
            memcpy(out, ": ", 2);
            out += 2;
            memcpy(out, f.value, (size_t)f.value_len);
            out += f.value_len;
            if (secure_add) {
                memcpy(out, "; Secure", 8);
                out += 8;
            }
            memcpy(out, "\r\n", 2);
            out += 2;
        }
    }
    if (result != NULL && hsts != NULL && !has_hsts) {
        memcpy(out, "strict-transport-security: ", 27);
        out += 27;
        memcpy(out, hsts, (size_t)hsts_len);
        out += hsts_len;
        memcpy(out, "\r\n", 2);
        out += 2;
    }
    if (result != NULL && out != PyBytes_AS_STRING(result) + size) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_SystemError, "response_block: size mismatch");
    }
#undef LNAME
    fields_free(&fs);
    tokens_free(&named);
    if (lowered != small_lowered)
        PyMem_Free(lowered);
    return result;
}

/* ------------------------------------------------------------ upstream request */

typedef struct {
    const char *p;
    Py_ssize_t n;
} slice_t;

static int
as_slice(PyObject *o, slice_t *s, const char *what)
{
    if (!PyBytes_Check(o)) {
        PyErr_Format(PyExc_TypeError, "upstream_request_head: %s must be bytes", what);
        return 0;
    }
    s->p = PyBytes_AS_STRING(o);
    s->n = PyBytes_GET_SIZE(o);
    return 1;
}

static PyObject *
upstream_request_head(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError,
                        "upstream_request_head(method, target, host, headers, client_address, scheme, "
                        "server_port, trusted, upgrade, framing)");
        return NULL;
    }
    slice_t method, target, host, scheme, upgrade, framing = {"", 0};
    if (!as_slice(args[0], &method, "method") || !as_slice(args[1], &target, "target") ||
        !as_slice(args[2], &host, "host") || !as_slice(args[5], &scheme, "scheme") ||
        !as_slice(args[8], &upgrade, "upgrade"))
        return NULL;
    if (args[9] != Py_None && !as_slice(args[9], &framing, "framing"))
        return NULL;
    PyObject *headers = args[3];
    if (!PyList_Check(headers) || !PyUnicode_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "upstream_request_head: headers must be a list, client_address a str");
        return NULL;
    }
    long port = PyLong_AsLong(args[6]);
    if (port == -1 && PyErr_Occurred())
        return NULL;
    int trusted = PyObject_IsTrue(args[7]);
    if (trusted < 0)
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(headers);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = PyList_GET_ITEM(headers, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(pair, 0)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(pair, 1))) {
            PyErr_SetString(PyExc_TypeError, "upstream_request_head: headers must be (bytes, bytes) pairs");
            return NULL;
        }
    }
    PyObject *client = PyUnicode_AsEncodedString(args[4], "ascii", "replace");
    if (client == NULL)
        return NULL;
    char port_text[24];
    int port_len = snprintf(port_text, sizeof port_text, "%ld", port);

#define NAME(i) PyTuple_GET_ITEM(PyList_GET_ITEM(headers, (i)), 0)
#define VALUE(i) PyTuple_GET_ITEM(PyList_GET_ITEM(headers, (i)), 1)
    /* Connection-named headers, minus the protected ones. */
    Py_ssize_t conn_total = 0;
    for (Py_ssize_t i = 0; i < count; i++)
        if (eq(PyBytes_AS_STRING(NAME(i)), PyBytes_GET_SIZE(NAME(i)), "connection"))
            conn_total += PyBytes_GET_SIZE(VALUE(i));
    tokens_t named;
    if (!tokens_init(&named, conn_total)) {
        Py_DECREF(client);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++)
        if (eq(PyBytes_AS_STRING(NAME(i)), PyBytes_GET_SIZE(NAME(i)), "connection"))
            tokens_add_value(&named, PyBytes_AS_STRING(VALUE(i)), PyBytes_GET_SIZE(VALUE(i)));
    /* drop the protected names from the tokens */
    Py_ssize_t kept_tokens = 0;
    for (Py_ssize_t i = 0; i < named.count; i++) {
        if (in_list(named.start[i], named.len[i], FORWARDING) ||
            in_list(named.start[i], named.len[i], PROTECTED_EXTRA))
            continue;
        named.start[kept_tokens] = named.start[i];
        named.len[kept_tokens] = named.len[i];
        kept_tokens++;
    }
    named.count = kept_tokens;

    /* Which headers pass, and the trusted forwarding values. */
    Py_ssize_t size = method.n + 1 + target.n + 17 + host.n + 2; /* "M T HTTP/1.1\r\nhost: H\r\n" */
    Py_ssize_t prior_for_total = 0, prior_for_count = 0;
    slice_t kept_proto = {NULL, 0}, kept_host = {NULL, 0}, kept_port = {NULL, 0};
    char small[128];
    char *pass = count <= (Py_ssize_t)sizeof small ? small : PyMem_Malloc((size_t)count);
    if (pass == NULL) {
        tokens_free(&named);
        Py_DECREF(client);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        const char *name = PyBytes_AS_STRING(NAME(i));
        Py_ssize_t name_len = PyBytes_GET_SIZE(NAME(i));
        pass[i] = 0;
        if (in_list(name, name_len, HOP_BY_HOP) || tokens_has(&named, name, name_len))
            continue;
        if (underscore_spelling_in(name, name_len, FORWARDING) || underscore_spelling_in(name, name_len, HOP_BY_HOP))
            continue;
        if (in_list(name, name_len, FORWARDING)) {
            if (trusted) {
                slice_t v = {PyBytes_AS_STRING(VALUE(i)), PyBytes_GET_SIZE(VALUE(i))};
                if (eq(name, name_len, "x-forwarded-for")) {
                    prior_for_total += v.n;
                    prior_for_count++;
                }
                else if (eq(name, name_len, "x-forwarded-proto") && kept_proto.p == NULL)
                    kept_proto = v;
                else if (eq(name, name_len, "x-forwarded-host") && kept_host.p == NULL)
                    kept_host = v;
                else if (eq(name, name_len, "x-forwarded-port") && kept_port.p == NULL)
                    kept_port = v;
            }
            continue;
        }
        pass[i] = 1;
        if (!eq(name, name_len, "host"))
            size += name_len + 2 + PyBytes_GET_SIZE(VALUE(i)) + 2;
    }
    slice_t proto = kept_proto.p ? kept_proto : scheme;
    slice_t fhost = kept_host.p ? kept_host : host;
    slice_t fport = kept_port.p ? kept_port : (slice_t){port_text, port_len};
    Py_ssize_t client_len = PyBytes_GET_SIZE(client);
    Py_ssize_t for_len = prior_for_total + 2 * prior_for_count + client_len;
    size += 17 + for_len + 2 + 19 + proto.n + 2 + 18 + fhost.n + 2 + 18 + fport.n + 2;
    if (upgrade.n)
        size += 21 + 9 + upgrade.n + 2; /* "connection: upgrade\r\n" "upgrade: U\r\n" */
    if (framing.n)
        size += framing.n + 2;
    size += 2;

    PyObject *result = PyBytes_FromStringAndSize(NULL, size);
    if (result == NULL)
        goto done;
    char *out = PyBytes_AS_STRING(result);
#define PUT(ptr, len)                           \
    do {                                        \
        memcpy(out, (ptr), (size_t)(len));      \
        out += (len);                           \
    } while (0)
#define PUTS(lit) PUT(lit, sizeof(lit) - 1)
    PUT(method.p, method.n);
    PUTS(" ");
    PUT(target.p, target.n);
    PUTS(" HTTP/1.1\r\nhost: ");
    PUT(host.p, host.n);
    PUTS("\r\n");
    for (Py_ssize_t i = 0; i < count; i++) {
        if (!pass[i])
            continue;
        const char *name = PyBytes_AS_STRING(NAME(i));
        Py_ssize_t name_len = PyBytes_GET_SIZE(NAME(i));
        if (eq(name, name_len, "host"))
            continue;
        PUT(name, name_len);
        PUTS(": ");
        PUT(PyBytes_AS_STRING(VALUE(i)), PyBytes_GET_SIZE(VALUE(i)));
        PUTS("\r\n");
    }
    PUTS("x-forwarded-for: ");
    if (trusted && prior_for_count) {
        for (Py_ssize_t i = 0; i < count; i++) {
            const char *name = PyBytes_AS_STRING(NAME(i));
            Py_ssize_t name_len = PyBytes_GET_SIZE(NAME(i));
            if (!eq(name, name_len, "x-forwarded-for") || in_list(name, name_len, HOP_BY_HOP) ||
                tokens_has(&named, name, name_len))
                continue;
            PUT(PyBytes_AS_STRING(VALUE(i)), PyBytes_GET_SIZE(VALUE(i)));
            PUTS(", ");
        }
    }
    PUT(PyBytes_AS_STRING(client), client_len);
    PUTS("\r\nx-forwarded-proto: ");
    PUT(proto.p, proto.n);
    PUTS("\r\nx-forwarded-host: ");
    PUT(fhost.p, fhost.n);
    PUTS("\r\nx-forwarded-port: ");
    PUT(fport.p, fport.n);
    PUTS("\r\n");
    if (upgrade.n) {
        PUTS("connection: upgrade\r\nupgrade: ");
        PUT(upgrade.p, upgrade.n);
        PUTS("\r\n");
    }
    if (framing.n) {
        PUT(framing.p, framing.n);
        PUTS("\r\n");
    }
    PUTS("\r\n");
    if (out != PyBytes_AS_STRING(result) + size) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_SystemError, "upstream_request_head: size mismatch");
    }
#undef PUT
#undef PUTS
#undef NAME
#undef VALUE
done:
    if (pass != small)
        PyMem_Free(pass);
    tokens_free(&named);
    Py_DECREF(client);
    return result;
}

/* ------------------------------------------------------------ module */

static PyObject *
configure(PyObject *self, PyObject *args)
{
    PyObject *head, *req_err, *resp_err;
    if (!PyArg_ParseTuple(args, "OOO:configure", &head, &req_err, &resp_err))
        return NULL;
    Py_XSETREF(RequestHead, Py_NewRef(head));
    Py_XSETREF(RequestError, Py_NewRef(req_err));
    Py_XSETREF(ResponseError, Py_NewRef(resp_err));
    find_head_slots();
    return PyBool_FromLong(head_direct);
}


/* ------------------------------------------------------------ HPACK decoding
 *
 * HpackDecoder decodes a client's header blocks (RFC 7541) exactly as the
 * hpack library's Decoder does, raw bytes only, which stays the pure Python
 * version and the specification: the same fields, the same table after each
 * block, and the same exception class for the same bad input
 * (tests/unit/test_hpack.py compares them).  Its errors are hpack's own
 * classes, handed over by configure_hpack(), so that h2 turns them into the
 * connection errors it always did.
 */

#include <stdint.h>

/* RFC 7541 Appendix B: the Huffman code of each symbol (256 is EOS), right-aligned, and its length. */
static const uint32_t HUFF_CODE[257] = {
    0x1ff8, 0x7fffd8, 0xfffffe2, 0xfffffe3, 0xfffffe4, 0xfffffe5,
    0xfffffe6, 0xfffffe7, 0xfffffe8, 0xffffea, 0x3ffffffc, 0xfffffe9,
    0xfffffea, 0x3ffffffd, 0xfffffeb, 0xfffffec, 0xfffffed, 0xfffffee,
    0xfffffef, 0xffffff0, 0xffffff1, 0xffffff2, 0x3ffffffe, 0xffffff3,
    0xffffff4, 0xffffff5, 0xffffff6, 0xffffff7, 0xffffff8, 0xffffff9,
    0xffffffa, 0xffffffb, 0x14, 0x3f8, 0x3f9, 0xffa,
    0x1ff9, 0x15, 0xf8, 0x7fa, 0x3fa, 0x3fb,
    0xf9, 0x7fb, 0xfa, 0x16, 0x17, 0x18,
    0x0, 0x1, 0x2, 0x19, 0x1a, 0x1b,
    0x1c, 0x1d, 0x1e, 0x1f, 0x5c, 0xfb,
    0x7ffc, 0x20, 0xffb, 0x3fc, 0x1ffa, 0x21,
    0x5d, 0x5e, 0x5f, 0x60, 0x61, 0x62,
    0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
    0x69, 0x6a, 0x6b, 0x6c, 0x6d, 0x6e,
    0x6f, 0x70, 0x71, 0x72, 0xfc, 0x73,
    0xfd, 0x1ffb, 0x7fff0, 0x1ffc, 0x3ffc, 0x22,
    0x7ffd, 0x3, 0x23, 0x4, 0x24, 0x5,
    0x25, 0x26, 0x27, 0x6, 0x74, 0x75,
    0x28, 0x29, 0x2a, 0x7, 0x2b, 0x76,
    0x2c, 0x8, 0x9, 0x2d, 0x77, 0x78,
    0x79, 0x7a, 0x7b, 0x7ffe, 0x7fc, 0x3ffd,
    0x1ffd, 0xffffffc, 0xfffe6, 0x3fffd2, 0xfffe7, 0xfffe8,
    0x3fffd3, 0x3fffd4, 0x3fffd5, 0x7fffd9, 0x3fffd6, 0x7fffda,
    0x7fffdb, 0x7fffdc, 0x7fffdd, 0x7fffde, 0xffffeb, 0x7fffdf,
    0xffffec, 0xffffed, 0x3fffd7, 0x7fffe0, 0xffffee, 0x7fffe1,
    0x7fffe2, 0x7fffe3, 0x7fffe4, 0x1fffdc, 0x3fffd8, 0x7fffe5,
    0x3fffd9, 0x7fffe6, 0x7fffe7, 0xffffef, 0x3fffda, 0x1fffdd,
    0xfffe9, 0x3fffdb, 0x3fffdc, 0x7fffe8, 0x7fffe9, 0x1fffde,
    0x7fffea, 0x3fffdd, 0x3fffde, 0xfffff0, 0x1fffdf, 0x3fffdf,
    0x7fffeb, 0x7fffec, 0x1fffe0, 0x1fffe1, 0x3fffe0, 0x1fffe2,
    0x7fffed, 0x3fffe1, 0x7fffee, 0x7fffef, 0xfffea, 0x3fffe2,
    0x3fffe3, 0x3fffe4, 0x7ffff0, 0x3fffe5, 0x3fffe6, 0x7ffff1,
    0x3ffffe0, 0x3ffffe1, 0xfffeb, 0x7fff1, 0x3fffe7, 0x7ffff2,
    0x3fffe8, 0x1ffffec, 0x3ffffe2, 0x3ffffe3, 0x3ffffe4, 0x7ffffde,
    0x7ffffdf, 0x3ffffe5, 0xfffff1, 0x1ffffed, 0x7fff2, 0x1fffe3,
    0x3ffffe6, 0x7ffffe0, 0x7ffffe1, 0x3ffffe7, 0x7ffffe2, 0xfffff2,
    0x1fffe4, 0x1fffe5, 0x3ffffe8, 0x3ffffe9, 0xffffffd, 0x7ffffe3,
    0x7ffffe4, 0x7ffffe5, 0xfffec, 0xfffff3, 0xfffed, 0x1fffe6,
    0x3fffe9, 0x1fffe7, 0x1fffe8, 0x7ffff3, 0x3fffea, 0x3fffeb,
    0x1ffffee, 0x1ffffef, 0xfffff4, 0xfffff5, 0x3ffffea, 0x7ffff4,
    0x3ffffeb, 0x7ffffe6, 0x3ffffec, 0x3ffffed, 0x7ffffe7, 0x7ffffe8,
    0x7ffffe9, 0x7ffffea, 0x7ffffeb, 0xffffffe, 0x7ffffec, 0x7ffffed,
    0x7ffffee, 0x7ffffef, 0x7fffff0, 0x3ffffee, 0x3fffffff,
};
static const uint8_t HUFF_BITS[257] = {
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28,
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6,
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5,
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23,
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23,
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25,
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23,
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
    30,
};

/* RFC 7541 Appendix A: the static table, entry 1 first. */
static const char *const STATIC_TABLE[61][2] = {
    {":authority", ""},
    {":method", "GET"},
    {":method", "POST"},
    {":path", "/"},
    {":path", "/index.html"},
    {":scheme", "http"},
    {":scheme", "https"},
    {":status", "200"},
    {":status", "204"},
    {":status", "206"},
    {":status", "304"},
    {":status", "400"},
    {":status", "404"},
    {":status", "500"},
    {"accept-charset", ""},
    {"accept-encoding", "gzip, deflate"},
    {"accept-language", ""},
    {"accept-ranges", ""},
    {"accept", ""},
    {"access-control-allow-origin", ""},
    {"age", ""},
    {"allow", ""},
    {"authorization", ""},
    {"cache-control", ""},
    {"content-disposition", ""},
    {"content-encoding", ""},
    {"content-language", ""},
    {"content-length", ""},
    {"content-location", ""},
    {"content-range", ""},
    {"content-type", ""},
    {"cookie", ""},
    {"date", ""},
    {"etag", ""},
    {"expect", ""},
    {"expires", ""},
    {"from", ""},
    {"host", ""},
    {"if-match", ""},
    {"if-modified-since", ""},
    {"if-none-match", ""},
    {"if-range", ""},
    {"if-unmodified-since", ""},
    {"last-modified", ""},
    {"link", ""},
    {"location", ""},
    {"max-forwards", ""},
    {"proxy-authenticate", ""},
    {"proxy-authorization", ""},
    {"range", ""},
    {"referer", ""},
    {"refresh", ""},
    {"retry-after", ""},
    {"server", ""},
    {"set-cookie", ""},
    {"strict-transport-security", ""},
    {"transfer-encoding", ""},
    {"user-agent", ""},
    {"vary", ""},
    {"via", ""},
    {"www-authenticate", ""},
};

static PyObject *HpackDecodingError = NULL;
static PyObject *HpackInvalidTableIndex = NULL;
static PyObject *HpackOversizedList = NULL;
static PyObject *HpackInvalidTableSize = NULL;
static PyObject *STATIC_FIELDS[61];  /* (name, value) tuples */

/* The Huffman code as a binary tree: children of node i are huff_tree[i][0]
   and [1]; a child > 0 is a node, a child < 0 the leaf of symbol -child - 1.
   A complete code of 257 symbols has 256 inner nodes. */
static int16_t huff_tree[256][2];

static int
init_hpack(void)
{
    int nodes = 1;
    memset(huff_tree, 0, sizeof(huff_tree));
    for (int sym = 0; sym < 257; sym++) {
        int node = 0;
        for (int bit = HUFF_BITS[sym] - 1; bit >= 0; bit--) {
            int b = (HUFF_CODE[sym] >> bit) & 1;
            if (bit == 0) {
                huff_tree[node][b] = (int16_t)(-sym - 1);
            } else {
                if (huff_tree[node][b] == 0) {
                    if (nodes >= 256)
                        return -1;
                    huff_tree[node][b] = (int16_t)nodes++;
                }
                node = huff_tree[node][b];
            }
        }
    }
    for (int i = 0; i < 61; i++) {
        STATIC_FIELDS[i] = Py_BuildValue("(y#y#)", STATIC_TABLE[i][0], (Py_ssize_t)strlen(STATIC_TABLE[i][0]),
                                         STATIC_TABLE[i][1], (Py_ssize_t)strlen(STATIC_TABLE[i][1]));
        if (STATIC_FIELDS[i] == NULL)
            return -1;
    }
    return 0;
}

/* Huffman-decoded bytes of src[0:n], or NULL with HPACKDecodingError: the
   EOS symbol inside, or padding that is longer than 7 bits or not all ones
   (RFC 7541 5.2). */
static PyObject *
huffman_decode(const unsigned char *src, Py_ssize_t n)
{
    /* The shortest code is 5 bits: at most 8/5 symbols per byte. */
    PyObject *out = PyBytes_FromStringAndSize(NULL, n + n / 2 + n / 8 + 1);
    if (out == NULL)
        return NULL;
    char *dst = PyBytes_AS_STRING(out);
    Py_ssize_t len = 0;
    int node = 0, depth = 0, ones = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = src[i];
        for (int bit = 7; bit >= 0; bit--) {
            int b = (c >> bit) & 1;
            int next = huff_tree[node][b];
            if (next < 0) {
                if (next == -257)
                    goto fail;  /* EOS */
                dst[len++] = (char)(-next - 1);
                node = depth = 0;
                ones = 1;
            } else {
                node = next;
                depth++;
                ones &= b;
            }
        }
    }
    if (depth > 7 || !ones)
        goto fail;
    if (_PyBytes_Resize(&out, len) < 0)
        return NULL;
    return out;
fail:
    Py_DECREF(out);
    PyErr_SetString(HpackDecodingError, "Invalid Huffman string");
    return NULL;
}

typedef struct {
    PyObject *field;  /* (name, value) */
    Py_ssize_t size;  /* 32 + len(name) + len(value) (RFC 7541 4.1) */
} hd_entry;

typedef struct {
    PyObject_HEAD
    hd_entry *ring;  /* the dynamic table, newest at ring[start] */
    Py_ssize_t cap, start, count;
    Py_ssize_t size, maxsize, max_allowed, max_list;
} HpackDecoder;

static void
hd_evict_to(HpackDecoder *d, Py_ssize_t limit)
{
    while (d->size > limit && d->count > 0) {
        hd_entry *e = &d->ring[(d->start + d->count - 1) % d->cap];
        d->size -= e->size;
        Py_CLEAR(e->field);
        d->count--;
    }
}

static void
hd_clear(HpackDecoder *d)
{
    hd_evict_to(d, -1);
    d->size = 0;
}

/* hpack's HeaderTable.maxsize setter. */
static void
hd_set_maxsize(HpackDecoder *d, Py_ssize_t value)
{
    Py_ssize_t old = d->maxsize;
    d->maxsize = value;
    if (value <= 0)
        hd_clear(d);
    else if (old > value)
        hd_evict_to(d, value);
}

/* hpack's HeaderTable.add: an entry larger than the table empties it. */
static int
hd_add(HpackDecoder *d, PyObject *field, Py_ssize_t size)
{
    if (size > d->maxsize) {
        hd_clear(d);
        return 0;
    }
    if (d->count == d->cap) {
        Py_ssize_t cap = d->cap ? d->cap * 2 : 16;
        hd_entry *ring = PyMem_Malloc(cap * sizeof(hd_entry));
        if (ring == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < d->count; i++)
            ring[i] = d->ring[(d->start + i) % d->cap];
        PyMem_Free(d->ring);
        d->ring = ring;
        d->cap = cap;
        d->start = 0;
    }
    d->start = (d->start + d->cap - 1) % d->cap;
    d->ring[d->start].field = Py_NewRef(field);
    d->ring[d->start].size = size;
    d->count++;
    d->size += size;
    hd_evict_to(d, d->maxsize);
    return 0;
}

/* Entry ``index`` (1-based: static, then dynamic), borrowed; NULL with InvalidTableIndex. */
static PyObject *
hd_get(HpackDecoder *d, uint64_t index)
{
    if (index >= 1 && index <= 61)
        return STATIC_FIELDS[index - 1];
    if (index > 61 && index - 62 < (uint64_t)d->count)
        return d->ring[(d->start + (Py_ssize_t)(index - 62)) % d->cap].field;
    PyErr_Format(HpackInvalidTableIndex, "Invalid table index %llu", (unsigned long long)index);
    return NULL;
}

/* An HPACK integer (RFC 7541 5.1) at p[0:n] with a ``prefix``-bit prefix, as
   hpack reads it: at most four continuation bytes before the last one.
   Returns the bytes it took, or -1 with HPACKDecodingError. */
static Py_ssize_t
hd_integer(const unsigned char *p, Py_ssize_t n, int prefix, uint64_t *value)
{
    uint64_t max = (1u << prefix) - 1;
    if (n < 1)
        goto fail;
    uint64_t number = p[0] & max;
    Py_ssize_t i = 1;
    if (number == max) {
        int shift = 0;
        for (;;) {
            if (i >= n)
                goto fail;
            unsigned char c = p[i++];
            number += (uint64_t)(c & 0x7f) << shift;
            if (c < 128)
                break;
            shift += 7;
            if (i > 5) {
                PyErr_SetString(HpackDecodingError, "Variable integer representation is too long");
                return -1;
            }
        }
    }
    *value = number;
    return i;
fail:
    PyErr_SetString(HpackDecodingError, "Unable to decode HPACK integer representation");
    return -1;
}

/* A string literal (RFC 7541 5.2) at p[0:n]: new reference in *out, bytes taken, or -1. */
static Py_ssize_t
hd_string(const unsigned char *p, Py_ssize_t n, PyObject **out)
{
    uint64_t length;
    Py_ssize_t used = hd_integer(p, n, 7, &length);
    if (used < 0)
        return -1;
    if (length > (uint64_t)(n - used)) {
        PyErr_SetString(HpackDecodingError, "Truncated header block");
        return -1;
    }
    *out = (p[0] & 0x80) ? huffman_decode(p + used, (Py_ssize_t)length)
                         : PyBytes_FromStringAndSize((const char *)p + used, (Py_ssize_t)length);
    if (*out == NULL)
        return -1;
    return used + (Py_ssize_t)length;
}

static PyObject *
HpackDecoder_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Py_ssize_t max_list = 65536;
    static char *kwlist[] = {"max_header_list_size", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n:HpackDecoder", kwlist, &max_list))
        return NULL;
    if (HpackDecodingError == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "configure_hpack() first");
        return NULL;
    }
    HpackDecoder *d = (HpackDecoder *)type->tp_alloc(type, 0);
    if (d == NULL)
        return NULL;
    d->ring = NULL;
    d->cap = d->start = d->count = d->size = 0;
    d->maxsize = d->max_allowed = 4096;
    d->max_list = max_list;
    return (PyObject *)d;
}

static void
HpackDecoder_dealloc(HpackDecoder *d)
{
    hd_clear(d);
    PyMem_Free(d->ring);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

/* decode(data, raw=True) -> [(name, value), ...]: one whole header block. */
static PyObject *
HpackDecoder_decode(HpackDecoder *d, PyObject *args, PyObject *kwds)
{
    Py_buffer view;
    int raw = 1;
    static char *kwlist[] = {"data", "raw", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|p:decode", kwlist, &view, &raw))
        return NULL;
    if (!raw) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "HpackDecoder decodes to bytes only (raw=True)");
        return NULL;
    }
    const unsigned char *p = view.buf;
    Py_ssize_t n = view.len, pos = 0, inflated = 0;
    PyObject *headers = PyList_New(0);
    if (headers == NULL)
        goto error;
    while (pos < n) {
        unsigned char c = p[pos];
        PyObject *field;  /* new reference */
        uint64_t index;
        Py_ssize_t used;
        if (c & 0x80) {  /* indexed field (6.1) */
            used = hd_integer(p + pos, n - pos, 7, &index);
            if (used < 0)
                goto error;
            field = hd_get(d, index);
            if (field == NULL)
                goto error;
            Py_INCREF(field);
            pos += used;
        } else if (!(c & 0x40) && (c & 0x20)) {  /* dynamic table size update (6.3) */
            if (PyList_GET_SIZE(headers)) {
                PyErr_SetString(HpackDecodingError, "Table size update not at the start of the block");
                goto error;
            }
            used = hd_integer(p + pos, n - pos, 5, &index);
            if (used < 0)
                goto error;
            if (index > (uint64_t)d->max_allowed) {
                PyErr_SetString(HpackInvalidTableSize, "Encoder exceeded max allowable table size");
                goto error;
            }
            hd_set_maxsize(d, (Py_ssize_t)index);
            pos += used;
            continue;
        } else {  /* a literal, added to the table (6.2.1) or not (6.2.2, 6.2.3) */
            int add = (c & 0x40) != 0;
            int prefix = add ? 6 : 4;
            PyObject *name, *value;
            if (c & ((1u << prefix) - 1)) {
                used = hd_integer(p + pos, n - pos, prefix, &index);
                if (used < 0)
                    goto error;
                PyObject *entry = hd_get(d, index);
                if (entry == NULL)
                    goto error;
                name = Py_NewRef(PyTuple_GET_ITEM(entry, 0));
                pos += used;
            } else {
                pos++;
                used = hd_string(p + pos, n - pos, &name);
                if (used < 0)
                    goto error;
                pos += used;
            }
            used = hd_string(p + pos, n - pos, &value);
            if (used < 0) {
                Py_DECREF(name);
                goto error;
            }
            pos += used;
            field = PyTuple_Pack(2, name, value);
            Py_DECREF(name);
            Py_DECREF(value);
            if (field == NULL)
                goto error;
            if (add && hd_add(d, field, 32 + PyBytes_GET_SIZE(PyTuple_GET_ITEM(field, 0)) +
                                              PyBytes_GET_SIZE(PyTuple_GET_ITEM(field, 1))) < 0) {
                Py_DECREF(field);
                goto error;
            }
        }
        inflated += 32 + PyBytes_GET_SIZE(PyTuple_GET_ITEM(field, 0)) + PyBytes_GET_SIZE(PyTuple_GET_ITEM(field, 1));
        int failed = PyList_Append(headers, field);
        Py_DECREF(field);
        if (failed < 0)
            goto error;
        if (inflated > d->max_list) {
            PyErr_Format(HpackOversizedList, "A header list larger than %zd has been received", d->max_list);
            goto error;
        }
    }
    if (d->maxsize > d->max_allowed) {
        PyErr_SetString(HpackInvalidTableSize, "Encoder did not shrink table size to within the max");
        goto error;
    }
    PyBuffer_Release(&view);
    return headers;
error:
    Py_XDECREF(headers);
    PyBuffer_Release(&view);
    return NULL;
}

static int
hd_set_size_t(PyObject *value, Py_ssize_t *out)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "cannot delete this attribute");
        return -1;
    }
    Py_ssize_t v = PyLong_AsSsize_t(value);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

static PyObject *
hd_get_max_list(HpackDecoder *d, void *closure)
{
    return PyLong_FromSsize_t(d->max_list);
}

static int
hd_set_max_list(HpackDecoder *d, PyObject *value, void *closure)
{
    return hd_set_size_t(value, &d->max_list);
}

static PyObject *
hd_get_max_allowed(HpackDecoder *d, void *closure)
{
    return PyLong_FromSsize_t(d->max_allowed);
}

static int
hd_set_max_allowed(HpackDecoder *d, PyObject *value, void *closure)
{
    return hd_set_size_t(value, &d->max_allowed);
}

static PyObject *
hd_get_table_size(HpackDecoder *d, void *closure)
{
    return PyLong_FromSsize_t(d->maxsize);
}

static int
hd_set_table_size(HpackDecoder *d, PyObject *value, void *closure)
{
    Py_ssize_t v;
    if (hd_set_size_t(value, &v) < 0)
        return -1;
    hd_set_maxsize(d, v);
    return 0;
}

/* The dynamic table, newest first, as hpack's header_table.dynamic_entries. */
static PyObject *
hd_get_entries(HpackDecoder *d, void *closure)
{
    PyObject *out = PyList_New(d->count);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < d->count; i++)
        PyList_SET_ITEM(out, i, Py_NewRef(d->ring[(d->start + i) % d->cap].field));
    return out;
}

static PyGetSetDef HpackDecoder_getset[] = {
    {"max_header_list_size", (getter)hd_get_max_list, (setter)hd_set_max_list,
     "the largest decoded list (32 + name + value per field) before OversizedHeaderListError", NULL},
    {"max_allowed_table_size", (getter)hd_get_max_allowed, (setter)hd_set_max_allowed,
     "the SETTINGS_HEADER_TABLE_SIZE the client has acknowledged", NULL},
    {"header_table_size", (getter)hd_get_table_size, (setter)hd_set_table_size,
     "the dynamic table's size limit, as the client last set it", NULL},
    {"dynamic_entries", (getter)hd_get_entries, NULL, "the dynamic table, newest first", NULL},
    {NULL},
};

static PyMethodDef HpackDecoder_methods[] = {
    {"decode", (PyCFunction)(void (*)(void))HpackDecoder_decode, METH_VARARGS | METH_KEYWORDS,
     "decode(data, raw=True) -> [(name, value), ...]"},
    {NULL},
};

static PyTypeObject HpackDecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tlsproxy._speedups.HpackDecoder",
    .tp_doc = "An HPACK decoder with hpack.Decoder's interface and behaviour, raw bytes only.",
    .tp_basicsize = sizeof(HpackDecoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = HpackDecoder_new,
    .tp_dealloc = (destructor)HpackDecoder_dealloc,
    .tp_methods = HpackDecoder_methods,
    .tp_getset = HpackDecoder_getset,
};

static PyObject *
configure_hpack(PyObject *self, PyObject *args)
{
    PyObject *decoding, *index, *oversized, *table_size;
    if (!PyArg_ParseTuple(args, "OOOO:configure_hpack", &decoding, &index, &oversized, &table_size))
        return NULL;
    Py_XSETREF(HpackDecodingError, Py_NewRef(decoding));
    Py_XSETREF(HpackInvalidTableIndex, Py_NewRef(index));
    Py_XSETREF(HpackOversizedList, Py_NewRef(oversized));
    Py_XSETREF(HpackInvalidTableSize, Py_NewRef(table_size));
    Py_RETURN_NONE;
}


static PyObject *HOST_NAME = NULL;   /* b"host" */
static PyObject *VERSION_2 = NULL;   /* b"2" */
static PyObject *EMPTY_BYTES = NULL; /* b"" */

/* ------------------------------------------------------------ HTTP/2 request heads
 *
 * h2_request_head is tlsproxy.http.h2.py_parse_request for a request it
 * passes: the same RequestHead from the same decoded fields.  For anything
 * else (a field that is not a 2-tuple of bytes, or a request the Python
 * version refuses, resets or answers) it returns None and the Python version
 * runs, which says how it failed: the refusals stay in one place, and the C
 * side can only pass what Python passes (tests/unit/test_h2.py checks that
 * both give the same head, or C None, for generated requests).
 */

static inline int
name_is(const char *s, Py_ssize_t n, const char *lit)
{
    return (size_t)n == strlen(lit) && memcmp(s, lit, (size_t)n) == 0;
}

static inline char
ascii_lower(char c)
{
    return (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
}

static int
same_lower(PyObject *a, PyObject *b)
{
    Py_ssize_t n = PyBytes_GET_SIZE(a);
    if (n != PyBytes_GET_SIZE(b))
        return 0;
    const char *x = PyBytes_AS_STRING(a), *y = PyBytes_AS_STRING(b);
    for (Py_ssize_t i = 0; i < n; i++)
        if (ascii_lower(x[i]) != ascii_lower(y[i]))
            return 0;
    return 1;
}

/* A value of valid_field's grammar with no blank at either end (the empty one included). */
static inline int
h2_value_ok(const unsigned char *s, Py_ssize_t n)
{
    if (n == 0)
        return 1;
    if (is_ows((char)s[0]) || is_ows((char)s[n - 1]))
        return 0;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!FIELDCH[s[i]])
            return 0;
    return 1;
}

static PyObject *
h2_request_head(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError,
                        "h2_request_head(fields, ended, max_header_size, max_header_line, max_header_count, "
                        "max_request_line)");
        return NULL;
    }
    if (!configured())
        return NULL;
    PyObject *fields = args[0];
    int ended = PyObject_IsTrue(args[1]);
    if (ended < 0)
        return NULL;
    Py_ssize_t limit[4];
    for (int i = 0; i < 4; i++) {
        limit[i] = PyLong_AsSsize_t(args[2 + i]);
        if (limit[i] == -1 && PyErr_Occurred())
            return NULL;
    }
    if (!PyList_CheckExact(fields))
        Py_RETURN_NONE;
    /* :method, :path, :scheme, :authority (borrowed). */
    PyObject *pseudo[4] = {NULL, NULL, NULL, NULL};
    PyObject *host_value = NULL; /* the one host field's value (borrowed) */
    Py_ssize_t count = PyList_GET_SIZE(fields), headers = 0, hosts = 0, size = 0, longest = 0;
    long long content_length = -1;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *field = PyList_GET_ITEM(fields, i);
        if (!PyTuple_CheckExact(field) || PyTuple_GET_SIZE(field) != 2)
            Py_RETURN_NONE;
        PyObject *name = PyTuple_GET_ITEM(field, 0), *value = PyTuple_GET_ITEM(field, 1);
        if (!PyBytes_CheckExact(name) || !PyBytes_CheckExact(value))
            Py_RETURN_NONE;
        const char *n = PyBytes_AS_STRING(name);
        const unsigned char *v = (const unsigned char *)PyBytes_AS_STRING(value);
        Py_ssize_t nlen = PyBytes_GET_SIZE(name), vlen = PyBytes_GET_SIZE(value);
        Py_ssize_t field_size = nlen + vlen;
        size += field_size + 32; /* as SETTINGS_MAX_HEADER_LIST_SIZE counts (RFC 9113 6.5.2) */
        if (field_size > longest)
            longest = field_size;
        if (nlen > 0 && n[0] == ':') {
            int slot = name_is(n, nlen, ":method") ? 0 : name_is(n, nlen, ":path") ? 1
                     : name_is(n, nlen, ":scheme") ? 2 : name_is(n, nlen, ":authority") ? 3 : -1;
            if (headers || slot < 0 || pseudo[slot] != NULL)
                Py_RETURN_NONE;
            for (Py_ssize_t j = 0; j < vlen; j++)
                if (!FIELDCH[v[j]])
                    Py_RETURN_NONE;
            pseudo[slot] = value;
            continue;
        }
        headers++;
        if (nlen == 0 || !h2_value_ok(v, vlen))
            Py_RETURN_NONE;
        for (Py_ssize_t j = 0; j < nlen; j++) {
            unsigned char c = (unsigned char)n[j];
            if (!TCHAR[c] || (c >= 'A' && c <= 'Z'))
                Py_RETURN_NONE;
        }
        switch (n[0]) {
        case 'c':
            if (name_is(n, nlen, "connection"))
                Py_RETURN_NONE;
            if (name_is(n, nlen, "content-length")) {
                if (content_length >= 0 || vlen == 0 || vlen > 18)
                    Py_RETURN_NONE;
                long long cl = 0;
                for (Py_ssize_t j = 0; j < vlen; j++) {
                    if (v[j] < '0' || v[j] > '9')
                        Py_RETURN_NONE;
                    cl = cl * 10 + (v[j] - '0');
                }
                content_length = cl;
            }
            break;
        case 'h':
            if (name_is(n, nlen, "host")) {
                hosts++;
                host_value = value;
            }
            break;
        case 'k':
            if (name_is(n, nlen, "keep-alive"))
                Py_RETURN_NONE;
            break;
        case 'p':
            if (name_is(n, nlen, "proxy-connection"))
                Py_RETURN_NONE;
            break;
        case 't':
            if (name_is(n, nlen, "transfer-encoding"))
                Py_RETURN_NONE;
            if (name_is(n, nlen, "te")) {
                if (vlen != 8)
                    Py_RETURN_NONE;
                for (int j = 0; j < 8; j++)
                    if (ascii_lower((char)v[j]) != "trailers"[j])
                        Py_RETURN_NONE;
            }
            break;
        case 'u':
            if (name_is(n, nlen, "upgrade"))
                Py_RETURN_NONE;
            break;
        }
    }
    PyObject *method = pseudo[0], *path = pseudo[1], *scheme = pseudo[2], *authority = pseudo[3];
    if (method == NULL || path == NULL || scheme == NULL)
        Py_RETURN_NONE;
    const char *m = PyBytes_AS_STRING(method), *p = PyBytes_AS_STRING(path), *s = PyBytes_AS_STRING(scheme);
    Py_ssize_t mlen = PyBytes_GET_SIZE(method), plen = PyBytes_GET_SIZE(path), slen = PyBytes_GET_SIZE(scheme);
    if (mlen == 0 || plen == 0 || name_is(m, mlen, "CONNECT"))
        Py_RETURN_NONE;
    for (Py_ssize_t j = 0; j < mlen; j++)
        if (!TCHAR[(unsigned char)m[j]])
            Py_RETURN_NONE;
    for (Py_ssize_t j = 0; j < plen; j++)
        if (p[j] == ' ' || p[j] == '#' || p[j] == '\t')
            Py_RETURN_NONE;
    if (ended && content_length > 0)
        Py_RETURN_NONE;
    if (size > limit[0] || longest + 2 > limit[1] || headers > limit[2])
        Py_RETURN_NONE;
    if (!name_is(s, slen, "https") && !name_is(s, slen, "http"))
        Py_RETURN_NONE;
    if (!(p[0] == '/' || (plen == 1 && p[0] == '*' && name_is(m, mlen, "OPTIONS"))))
        Py_RETURN_NONE;
    if (plen > limit[3])
        Py_RETURN_NONE;
    PyObject *host;
    if (authority != NULL && PyBytes_GET_SIZE(authority) > 0) {
        if (hosts) {
            for (Py_ssize_t i = 0; i < count; i++) {
                PyObject *field = PyList_GET_ITEM(fields, i);
                PyObject *name = PyTuple_GET_ITEM(field, 0);
                if (name_is(PyBytes_AS_STRING(name), PyBytes_GET_SIZE(name), "host") &&
                    !same_lower(PyTuple_GET_ITEM(field, 1), authority))
                    Py_RETURN_NONE;
            }
        }
        host = authority;
    }
    else if (hosts == 1)
        host = host_value;
    else
        Py_RETURN_NONE;
    const char *h = PyBytes_AS_STRING(host);
    Py_ssize_t hlen = PyBytes_GET_SIZE(host);
    for (Py_ssize_t j = 0; j < hlen; j++)
        if (!HOSTCH[(unsigned char)h[j]])
            Py_RETURN_NONE;
    /* Passed: the head. */
    PyObject *lower = PyBytes_FromStringAndSize(NULL, hlen);
    if (lower == NULL)
        return NULL;
    for (Py_ssize_t j = 0; j < hlen; j++)
        PyBytes_AS_STRING(lower)[j] = ascii_lower(h[j]);
    PyObject *list = PyList_New(1 + headers - (hosts ? hosts : 0));
    PyObject *first = list == NULL ? NULL : PyTuple_Pack(2, HOST_NAME, host);
    if (first == NULL) {
        Py_XDECREF(list);
        Py_DECREF(lower);
        return NULL;
    }
    PyList_SET_ITEM(list, 0, first);
    Py_ssize_t at = 1;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *field = PyList_GET_ITEM(fields, i);
        PyObject *name = PyTuple_GET_ITEM(field, 0);
        const char *n = PyBytes_AS_STRING(name);
        Py_ssize_t nlen = PyBytes_GET_SIZE(name);
        if ((nlen > 0 && n[0] == ':') || (hosts && name_is(n, nlen, "host")))
            continue;
        PyList_SET_ITEM(list, at++, Py_NewRef(field));
    }
    PyObject *length;
    if (ended || content_length < 0)
        length = Py_NewRef(Py_None);
    else if ((length = PyLong_FromLongLong(content_length)) == NULL) {
        Py_DECREF(list);
        Py_DECREF(lower);
        return NULL;
    }
    PyObject *items[8] = {
        method, path, VERSION_2, lower, list, length, (!ended && content_length < 0) ? Py_True : Py_False, EMPTY_BYTES,
    };
    PyObject *head = make_request_head(items);
    Py_DECREF(lower);
    Py_DECREF(list);
    Py_DECREF(length);
    return head;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(RequestHead, RequestError, ResponseError) -> whether heads are made without calling the class"},
    {"parse_request_head", (PyCFunction)(void (*)(void))parse_request_head, METH_FASTCALL,
     "parse_request_head(head, max_header_count) -> (RequestHead, keep_alive)"},
    {"parse_response_head", parse_response_head, METH_O,
     "parse_response_head(head) -> (status, reason, fields, content_length, chunked, keep_alive)"},
    {"response_block", (PyCFunction)(void (*)(void))response_block, METH_FASTCALL,
     "response_block(block, hsts, secure_cookies, keep_upgrade=False) -> bytes"},
    {"upstream_request_head", (PyCFunction)(void (*)(void))upstream_request_head, METH_FASTCALL,
     "upstream_request_head(method, target, host, headers, client_address, scheme, server_port, trusted, "
     "upgrade, framing) -> bytes"},
    {"configure_hpack", configure_hpack, METH_VARARGS,
     "configure_hpack(HPACKDecodingError, InvalidTableIndex, OversizedHeaderListError, InvalidTableSizeError)"},
    {"h2_request_head", (PyCFunction)(void (*)(void))h2_request_head, METH_FASTCALL,
     "h2_request_head(fields, ended, max_header_size, max_header_line, max_header_count, max_request_line) "
     "-> RequestHead, or None where the Python version must decide"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tlsproxy._speedups",
    .m_doc = "C versions of tlsproxy's per-request pure functions.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    init_tables();
    HOST_NAME = PyBytes_FromString("host");
    VERSION_2 = PyBytes_FromString("2");
    EMPTY_BYTES = PyBytes_FromString("");
    if (HOST_NAME == NULL || VERSION_2 == NULL || EMPTY_BYTES == NULL)
        return NULL;
    if (init_hpack() < 0 || PyType_Ready(&HpackDecoderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddObjectRef(m, "HpackDecoder", (PyObject *)&HpackDecoderType) < 0)
        Py_CLEAR(m);
    return m;
}
