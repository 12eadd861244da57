/* ignition-agent: the guest side of the pytest-ignition agent protocol (docs/agent-protocol.md).
 *
 * One single-threaded poll loop serves every transport (AF_VSOCK, a virtio-serial port, a Unix
 * socket for host-side tests). Each transport carries one framed byte stream per connection; exec,
 * file transfer and clock/entropy sync requests are multiplexed on it by channel id. Nothing in the
 * loop blocks on the host or on a child: pipes and sockets are non-blocking, output is buffered with
 * back-pressure, and every length and string from the host is bounds-checked before use.
 *
 * Built static: musl-gcc -static -Os -o ignition-agent <every .c in guest/agent> (plain gcc works too). */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "protocol.h"

/* musl ships no kernel uapi headers: declare the few kernel ABI items used here. */
#ifndef AF_VSOCK
#define AF_VSOCK 40
#endif
struct ig_sockaddr_vm {
    unsigned short svm_family;
    unsigned short svm_reserved1;
    unsigned int svm_port;
    unsigned int svm_cid;
    unsigned char svm_zero[4];
};
#define IG_VMADDR_CID_ANY 0xFFFFFFFFu
#define IG_RNDADDENTROPY 0x40085203 /* _IOW('R', 0x03, int[2]) */
#define IG_RNDRESEEDCRNG 0x5207     /* _IO('R', 0x07) */

#define OUT_HIGH (1u << 20)          /* stop reading child pipes above this much queued output */
#define OUT_GET_HIGH (256u * 1024u)  /* stop streaming a GET file above this */
#define OUT_STOP_INPUT (8u << 20)    /* host is not reading: stop reading its requests */
#define STDIN_STOP_INPUT (16u << 20) /* a child is not reading its stdin: stop reading requests */
#define MAX_PROCS_PER_CONN 256
#define MAX_XFERS_PER_CONN 256
#define MAX_CONNS 64
#define MAX_ARGS 65536
#define MAX_WALK_DEPTH 64
#define MAX_LOGGED_ERRORS 10
#define SERIAL_BACKOFF_MS 20
#define RETRY_MS 1000
#define DRAIN_LIMIT (1u << 20)

static const char *const DEFAULT_ENV[] = {"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                         "HOME=/root"};

/* ---------------------------------------------------------------- buffers */

struct buf {
    uint8_t *p;
    size_t off, len, cap; /* live bytes are p[off, len) */
};

static size_t buf_used(const struct buf *b) { return b->len - b->off; }

static int buf_reserve(struct buf *b, size_t extra) {
    if (b->off && (b->off == b->len || b->cap - b->len < extra)) {
        memmove(b->p, b->p + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
    }
    if (b->cap - b->len >= extra) return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - b->len < extra) {
        if (cap > SIZE_MAX / 2) return -1;
        cap *= 2;
    }
    uint8_t *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_append(struct buf *b, const void *data, size_t n) {
    if (buf_reserve(b, n) < 0) return -1;
    if (n) memcpy(b->p + b->len, data, n);
    b->len += n;
    return 0;
}

static void buf_consume(struct buf *b, size_t n) {
    b->off += n;
    if (b->off >= b->len) b->off = b->len = 0;
}

static void buf_free(struct buf *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* Release memory kept after a burst (e.g. a 1 MiB frame) once the buffer is empty. */
static void buf_trim(struct buf *b) {
    if (buf_used(b) == 0 && b->cap > (256u * 1024u)) buf_free(b);
}

static void put_le32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put_le64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get_le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get_le64(const uint8_t *p) { return (uint64_t)get_le32(p) | (uint64_t)get_le32(p + 4) << 32; }

/* ---------------------------------------------------------------- state */

enum conn_kind { CK_SOCKET, CK_SERIAL };

struct conn {
    struct conn *next;
    int fd;
    int kind;
    int dead;              /* socket: closed, freed at the end of the loop iteration */
    struct buf in, out;
    uint64_t skip;         /* bytes of an oversize payload still to discard */
    int resyncing;         /* bad magic already reported for this run of garbage */
    int logged;            /* protocol errors logged so far (the log is rate-limited) */
    int64_t backoff_until; /* serial: peer away, do not poll before this (monotonic ms) */
    int session_active;    /* serial: bytes seen since the last "peer went away" */
};

struct proc {
    struct proc *next;
    struct conn *conn; /* NULL once the connection is gone: reap silently */
    uint32_t chan;
    pid_t pid;
    int in_fd, out_fd, err_fd;
    struct buf inq;
    int in_close; /* close stdin once inq is written */
    int64_t deadline;
    int timed_out, reaped, status, done;
    int pty; /* EXEC_PTY: out_fd is the pty master, in_fd a dup of it; no stderr */
};

enum xfer_kind { X_PUT, X_GET };

struct xfer {
    struct xfer *next;
    struct conn *conn;
    uint32_t chan;
    int kind;
    int fd;
    int failed; /* PUT: error already reported; discard DATA until the empty one */
    int done;
    mode_t mode;
    char *path, *tmp;
};

struct listener {
    int fd;
    int is_vsock;
    unsigned port;
    const char *path;
    int64_t retry_at;
    int warned;
};

static struct conn *conns;
static struct proc *procs;
static struct xfer *xfers;
static struct listener lst_unix = {.fd = -1}, lst_vsock = {.fd = -1};
static int have_unix, have_vsock;
static const char *serial_name, *serial_path_opt;
static struct conn *serial_conn;
static int64_t serial_retry_at;
static int serial_warned;
static int sigchld_pipe[2] = {-1, -1};
static int sync_dry_run;
static unsigned tmp_counter;

/* The agent's stderr is usually the guest console, which a test may be driving: stay quiet
 * unless something is wrong, or --verbose asks for the session log. */
static int verbose;
#define INFO(...) \
    do { \
        if (verbose) logmsg(__VA_ARGS__); \
    } while (0)

static void logmsg(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("ignition-agent: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* ---------------------------------------------------------------- sending */

static void conn_fail(struct conn *c, const char *why);
static void tun_drop_conn(struct conn *c);

/* Reserve a frame header in the output; returns the header's offset in c->out. */
static int frame_begin(struct conn *c, size_t payload_room, size_t *hdr_at) {
    if (buf_reserve(&c->out, IG_HEADER + payload_room) < 0) {
        conn_fail(c, "out of memory");
        return -1;
    }
    *hdr_at = c->out.len;
    c->out.len += IG_HEADER;
    return 0;
}

static void frame_end(struct conn *c, size_t hdr_at, int type, uint32_t chan) {
    uint8_t *h = c->out.p + hdr_at;
    size_t len = c->out.len - hdr_at - IG_HEADER;
    h[0] = IG_MAGIC0;
    h[1] = IG_MAGIC1;
    h[2] = IG_VERSION;
    h[3] = (uint8_t)type;
    put_le32(h + 4, chan);
    put_le32(h + 8, (uint32_t)len);
}

static void send_frame(struct conn *c, int type, uint32_t chan, const void *payload, size_t len) {
    size_t at;
    if (c->dead || frame_begin(c, len, &at) < 0) return;
    if (len) memcpy(c->out.p + c->out.len, payload, len);
    c->out.len += len;
    frame_end(c, at, type, chan);
}

static void send_error(struct conn *c, uint32_t chan, uint32_t code, const char *fmt, ...) {
    uint8_t msg[4 + 512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf((char *)msg + 4, sizeof msg - 4, fmt, ap);
    va_end(ap);
    if (n < 0) n = 0;
    if ((size_t)n > sizeof msg - 5) n = (int)(sizeof msg - 5);
    put_le32(msg, code);
    /* errno answers (a missing file) are ordinary; malformed frames are worth a console line */
    int notable = code >= 1000 && code != E_UNKNOWN_CHAN;
    if ((notable || verbose) && c->logged < MAX_LOGGED_ERRORS) {
        c->logged++;
        logmsg("error %u on chan %u: %s", code, chan, (char *)msg + 4);
    }
    send_frame(c, T_ERROR, chan, msg, 4 + (size_t)n);
}

static void send_ok(struct conn *c, uint32_t chan) { send_frame(c, T_OK, chan, NULL, 0); }

/* Write as much queued output as the transport takes now. */
static void conn_flush(struct conn *c) {
    while (!c->dead && buf_used(&c->out)) {
        ssize_t n = write(c->fd, c->out.p + c->out.off, buf_used(&c->out));
        if (n > 0) {
            buf_consume(&c->out, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (c->kind == CK_SERIAL) return; /* disconnected host: the read side notices */
        conn_fail(c, n < 0 ? strerror(errno) : "short write");
        return;
    }
    buf_trim(&c->out);
}

/* ---------------------------------------------------------------- processes */

static struct proc *find_proc(struct conn *c, uint32_t chan) {
    for (struct proc *p = procs; p; p = p->next)
        if (p->conn == c && p->chan == chan && !p->done) return p;
    return NULL;
}

static struct xfer *find_xfer(struct conn *c, uint32_t chan) {
    for (struct xfer *x = xfers; x; x = x->next)
        if (x->conn == c && x->chan == chan && !x->done) return x;
    return NULL;
}

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

/* Signal the child's process group; before the child's setsid() the group does not exist yet. */
static int signal_proc(struct proc *p, int sig) {
    if (kill(-p->pid, sig) == 0) return 0;
    if (errno == ESRCH && !p->reaped) return kill(p->pid, sig);
    return -1;
}

/* Forward one pipe read as a STDOUT/STDERR frame; returns bytes read, 0 at EOF, -1 for "no data". */
static ssize_t pump_output(struct proc *p, int *fd, int type) {
    struct conn *c = p->conn;
    size_t at;
    if (!c || c->dead) {
        close_fd(fd);
        return 0;
    }
    if (frame_begin(c, IG_CHUNK, &at) < 0) return 0;
    ssize_t n;
    do n = read(*fd, c->out.p + c->out.len, IG_CHUNK);
    while (n < 0 && errno == EINTR);
    if (n > 0) {
        c->out.len += (size_t)n;
        frame_end(c, at, type, p->chan);
        return n;
    }
    c->out.len = at; /* drop the reserved header */
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return -1;
    close_fd(fd);
    send_frame(c, type, p->chan, NULL, 0); /* EOF marker */
    return 0;
}

static void proc_maybe_finish(struct proc *p) {
    if (p->done || !p->reaped || p->out_fd >= 0 || p->err_fd >= 0) return;
    p->done = 1;
    close_fd(&p->in_fd);
    buf_free(&p->inq);
    if (!p->conn || p->conn->dead) return;
    uint8_t e[12];
    int32_t code = -1, sig = 0;
    if (WIFEXITED(p->status)) code = WEXITSTATUS(p->status);
    else if (WIFSIGNALED(p->status)) sig = WTERMSIG(p->status);
    put_le32(e, (uint32_t)code);
    put_le32(e + 4, (uint32_t)sig);
    put_le32(e + 8, p->timed_out ? EXIT_TIMED_OUT : 0);
    send_frame(p->conn, T_EXIT, p->chan, e, sizeof e);
}

/* The leader exited: its output is all in the pipes now. Take what is there and call it EOF, so a
 * background process that inherited the pipes does not hold the EXIT back. */
static void proc_on_reaped(struct proc *p) {
    int *fds[2] = {&p->out_fd, &p->err_fd};
    int types[2] = {T_STDOUT, T_STDERR};
    for (int i = 0; i < 2; i++) {
        size_t total = 0;
        while (*fds[i] >= 0 && total < DRAIN_LIMIT) {
            ssize_t n = pump_output(p, fds[i], types[i]);
            if (n <= 0) break;
            total += (size_t)n;
        }
        if (*fds[i] >= 0) {
            close_fd(fds[i]);
            if (p->conn && !p->conn->dead) send_frame(p->conn, types[i], p->chan, NULL, 0);
        }
    }
    close_fd(&p->in_fd);
    proc_maybe_finish(p);
}

static void reap_children(void) {
    for (;;) {
        int st;
        pid_t pid = waitpid(-1, &st, WNOHANG);
        if (pid <= 0) return;
        for (struct proc *p = procs; p; p = p->next) {
            if (p->pid == pid && !p->reaped) {
                p->reaped = 1;
                p->status = st;
                proc_on_reaped(p);
                break;
            }
        }
    }
}

static void proc_write_stdin(struct proc *p) {
    while (p->in_fd >= 0 && buf_used(&p->inq)) {
        ssize_t n = write(p->in_fd, p->inq.p + p->inq.off, buf_used(&p->inq));
        if (n > 0) {
            buf_consume(&p->inq, (size_t)n);
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        /* EPIPE: the child closed its stdin; what it did not read is dropped */
        close_fd(&p->in_fd);
        buf_free(&p->inq);
        return;
    }
    buf_trim(&p->inq);
    if (p->in_close && p->in_fd >= 0 && !buf_used(&p->inq)) close_fd(&p->in_fd);
}

/* Detach a connection's children and transfers: kill the process groups, reap them later. */
static void conn_drop_work(struct conn *c) {
    for (struct proc *p = procs; p; p = p->next) {
        if (p->conn != c) continue;
        if (!p->reaped) signal_proc(p, SIGKILL);
        p->conn = NULL;
        close_fd(&p->in_fd);
        close_fd(&p->out_fd);
        close_fd(&p->err_fd);
        buf_free(&p->inq);
        if (p->reaped) p->done = 1;
    }
    for (struct xfer *x = xfers; x; x = x->next) {
        if (x->conn != c) continue;
        close_fd(&x->fd);
        if (x->tmp) unlink(x->tmp);
        x->conn = NULL;
        x->done = 1;
    }
    tun_drop_conn(c);
}

static void conn_reset_session(struct conn *c) {
    conn_drop_work(c);
    buf_free(&c->in);
    buf_free(&c->out);
    c->skip = 0;
    c->resyncing = 0;
    c->logged = 0;
    c->session_active = 0;
}

static void conn_fail(struct conn *c, const char *why) {
    if (c->dead) return;
    if (c->kind == CK_SERIAL) {
        if (c->session_active) INFO("serial: session ended (%s)", why);
        conn_reset_session(c);
        c->backoff_until = now_ms() + SERIAL_BACKOFF_MS;
        return;
    }
    conn_drop_work(c);
    c->dead = 1;
}

/* ---------------------------------------------------------------- requests */

/* Bounded reader over a request payload. */
struct rd {
    const uint8_t *p;
    size_t len, pos;
    int bad;
};

static uint32_t rd_u32(struct rd *r) {
    if (r->len - r->pos < 4) {
        r->bad = 1;
        return 0;
    }
    uint32_t v = get_le32(r->p + r->pos);
    r->pos += 4;
    return v;
}

static const char *rd_str(struct rd *r) {
    if (r->bad || r->pos >= r->len) {
        r->bad = 1;
        return NULL;
    }
    const uint8_t *s = r->p + r->pos;
    const uint8_t *nul = memchr(s, 0, r->len - r->pos);
    if (!nul) {
        r->bad = 1;
        return NULL;
    }
    r->pos += (size_t)(nul - s) + 1;
    return (const char *)s;
}

static int env_key_matches(const char *a, const char *b) {
    size_t ka = strcspn(a, "="), kb = strcspn(b, "=");
    return ka == kb && memcmp(a, b, ka) == 0;
}

static void child_fail(const char *what, const char *arg, int code) {
    char msg[600];
    int n = snprintf(msg, sizeof msg, "ignition-agent: %s %s: %s\n", what, arg, strerror(errno));
    if (n > 0) {
        ssize_t w = write(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
        (void)w;
    }
    _exit(code);
}

/* ---------------------------------------------------------------- pty exec (EXEC_PTY, WINSIZE) */

#ifndef TIOCGPTPEER
#define TIOCGPTPEER 0x5441 /* _IO('T', 0x41), Linux 4.13 */
#endif

/* A new pty pair: fds[0] the master, fds[1] the slave, both close-on-exec. The slave is opened
 * from the master (TIOCGPTPEER), so no /dev/pts path is needed where the command may be chrooted. */
static int pty_open(int fds[2]) {
    int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (m < 0) return -1;
    int s = -1;
    if (unlockpt(m) == 0) {
        s = ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
        if (s < 0) {
            char name[64];
            if (ptsname_r(m, name, sizeof name) == 0) s = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
        }
    }
    if (s < 0) {
        int e = errno;
        close(m);
        errno = e;
        return -1;
    }
    fds[0] = m;
    fds[1] = s;
    return 0;
}

/* In the child, after setsid(): the slave becomes the controlling tty and fds 0-2. */
static int pty_child(int slave) {
    /* Job control needs the terminal signals at their defaults (an agent started from a shell
     * without job control inherits SIGINT and SIGQUIT ignored). */
    static const int sigs[] = {SIGINT, SIGQUIT, SIGTSTP, SIGTTIN, SIGTTOU, SIGHUP, SIGWINCH};
    for (size_t i = 0; i < sizeof sigs / sizeof *sigs; i++) signal(sigs[i], SIG_DFL);
    if (ioctl(slave, TIOCSCTTY, 0) < 0) return -1;
    for (int fd = 0; fd < 3; fd++)
        if (dup2(slave, fd) < 0) return -1;
    return 0;
}

/* In the agent: the master carries output (out_fd) and input (in_fd, a dup: closing stdin with an
 * empty STDIN frame must not hang the terminal up). */
static void pty_attach(struct proc *p) {
    p->pty = 1;
    p->in_fd = fcntl(p->out_fd, F_DUPFD_CLOEXEC, 3);
}

static void handle_winsize(struct conn *c, uint32_t chan, const uint8_t *pl, size_t len) {
    if (len != 8) return send_error(c, chan, E_BAD_PAYLOAD, "WINSIZE: payload must be 8 bytes");
    struct proc *p = find_proc(c, chan);
    if (!p) return send_error(c, chan, E_UNKNOWN_CHAN, "WINSIZE: no process on channel %u", chan);
    if (!p->pty) return send_error(c, chan, ENOTTY, "WINSIZE: channel %u has no pty", chan);
    struct winsize ws = {
        .ws_row = (unsigned short)(pl[0] | pl[1] << 8),
        .ws_col = (unsigned short)(pl[2] | pl[3] << 8),
        .ws_xpixel = (unsigned short)(pl[4] | pl[5] << 8),
        .ws_ypixel = (unsigned short)(pl[6] | pl[7] << 8),
    };
    int fd = p->in_fd >= 0 ? p->in_fd : p->out_fd;
    if (fd < 0) return; /* the terminal is gone: nothing to resize */
    /* The kernel sends SIGWINCH to the foreground process group. */
    if (ioctl(fd, TIOCSWINSZ, &ws) < 0) send_error(c, chan, (uint32_t)errno, "WINSIZE: %s", strerror(errno));
}

static void handle_exec(struct conn *c, uint32_t chan, const uint8_t *pl, size_t len) {
    struct rd r = {pl, len, 0, 0};
    uint32_t timeout_ms = rd_u32(&r), flags = rd_u32(&r), argc = rd_u32(&r), envc = rd_u32(&r);
    if (r.bad) return send_error(c, chan, E_BAD_PAYLOAD, "EXEC: short header");
    if (argc < 1 || argc > MAX_ARGS || envc > MAX_ARGS || flags & ~(EXEC_SHELL | EXEC_STDIN | EXEC_PTY))
        return send_error(c, chan, E_BAD_PAYLOAD, "EXEC: bad argc/envc/flags");
    if (find_proc(c, chan) || find_xfer(c, chan))
        return send_error(c, chan, E_CHAN_BUSY, "EXEC: channel %u is in use", chan);
    int nprocs = 0;
    for (struct proc *p = procs; p; p = p->next) nprocs += p->conn == c && !p->done;
    if (nprocs >= MAX_PROCS_PER_CONN) return send_error(c, chan, E_LIMIT, "EXEC: too many processes");

    size_t nargv = argc + (flags & EXEC_SHELL ? 2 : 0) + 1;
    size_t nenv = envc + sizeof DEFAULT_ENV / sizeof *DEFAULT_ENV + 1;
    const char **argv = calloc(nargv, sizeof *argv), **envp = calloc(nenv, sizeof *envp);
    int pin[2] = {-1, -1}, pout[2] = {-1, -1}, perr[2] = {-1, -1};
    struct proc *p = NULL;
    if (!argv || !envp) {
        send_error(c, chan, ENOMEM, "EXEC: out of memory");
        goto out;
    }
    size_t ai = 0;
    if (flags & EXEC_SHELL) {
        argv[ai++] = "/bin/sh";
        argv[ai++] = "-c";
    }
    for (uint32_t i = 0; i < argc; i++) argv[ai++] = rd_str(&r);
    size_t ei = 0;
    for (uint32_t i = 0; i < envc; i++) {
        const char *e = rd_str(&r);
        if (e && (!strchr(e, '=') || e[0] == '=')) r.bad = 1;
        envp[ei++] = e;
    }
    const char *cwd = rd_str(&r);
    if (r.bad || r.pos != len || !argv[flags & EXEC_SHELL ? 2 : 0][0]) {
        send_error(c, chan, E_BAD_PAYLOAD, "EXEC: malformed argv/env/cwd");
        goto out;
    }
    for (size_t d = 0; d < sizeof DEFAULT_ENV / sizeof *DEFAULT_ENV; d++) {
        int overridden = 0;
        for (size_t i = 0; i < envc; i++) overridden |= env_key_matches(envp[i], DEFAULT_ENV[d]);
        if (!overridden) envp[ei++] = DEFAULT_ENV[d];
    }
    if (!cwd[0]) cwd = "/";
    struct stat st;
    int e = stat(cwd, &st) < 0 ? errno : S_ISDIR(st.st_mode) ? 0 : ENOTDIR;
    if (e) {
        send_error(c, chan, (uint32_t)e, "EXEC: cwd %s: %s", cwd, strerror(e));
        goto out;
    }
    p = calloc(1, sizeof *p);
    if (!p || ((flags & EXEC_PTY) ? pty_open(pout) < 0
                                  : (pipe2(pout, O_CLOEXEC) < 0 || pipe2(perr, O_CLOEXEC) < 0 ||
                                     ((flags & EXEC_STDIN) && pipe2(pin, O_CLOEXEC) < 0)))) {
        send_error(c, chan, (uint32_t)(p ? errno : ENOMEM), "EXEC: pipe: %s", strerror(errno));
        goto out;
    }
    pid_t pid = fork();
    if (pid < 0) {
        send_error(c, chan, (uint32_t)errno, "EXEC: fork: %s", strerror(errno));
        goto out;
    }
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        setsid();
        if (flags & EXEC_PTY) {
            if (pty_child(pout[1]) < 0) _exit(127);
            goto exec_it;
        }
        int in = pin[0];
        if (in < 0) in = open("/dev/null", O_RDONLY | O_CLOEXEC);
        if (in < 0 || dup2(in, 0) < 0 || dup2(pout[1], 1) < 0 || dup2(perr[1], 2) < 0) _exit(127);
    exec_it:
        if (chdir(cwd) < 0) child_fail("chdir", cwd, 127);
        extern char **environ;
        environ = (char **)envp;
        execvp(argv[0], (char *const *)argv);
        child_fail("exec", argv[0], errno == ENOENT ? 127 : 126);
    }
    close(pout[1]);
    close(perr[1]);
    if (pin[0] >= 0) close(pin[0]);
    p->conn = c;
    p->chan = chan;
    p->pid = pid;
    p->out_fd = pout[0];
    p->err_fd = perr[0];
    p->in_fd = pin[1];
    if (flags & EXEC_PTY) pty_attach(p);
    set_nonblock(p->out_fd);
    if (p->err_fd >= 0) set_nonblock(p->err_fd);
    if (p->in_fd >= 0) set_nonblock(p->in_fd);
    p->deadline = timeout_ms ? now_ms() + timeout_ms : 0;
    p->next = procs;
    procs = p;
    p = NULL;
    pin[1] = pout[0] = perr[0] = -1;
    pout[1] = perr[1] = pin[0] = -1;
out:
    for (int i = 0; i < 2; i++) {
        close_fd(&pin[i]);
        close_fd(&pout[i]);
        close_fd(&perr[i]);
    }
    free(p);
    free(argv);
    free(envp);
}

static void handle_stdin(struct conn *c, uint32_t chan, const uint8_t *pl, size_t len) {
    struct proc *p = find_proc(c, chan);
    if (!p) return send_error(c, chan, E_UNKNOWN_CHAN, "STDIN: no process on channel %u", chan);
    if (p->in_fd < 0) return; /* no stdin requested, or the child closed it: drop */
    if (p->in_close) return send_error(c, chan, E_BAD_PAYLOAD, "STDIN: already closed");
    if (len == 0) p->in_close = 1;
    else if (buf_append(&p->inq, pl, len) < 0) return conn_fail(c, "out of memory");
    proc_write_stdin(p);
}

static void handle_signal(struct conn *c, uint32_t chan, const uint8_t *pl, size_t len) {
    if (len != 4) return send_error(c, chan, E_BAD_PAYLOAD, "SIGNAL: payload must be 4 bytes");
    uint32_t sig = get_le32(pl);
    if (sig < 1 || sig > 64) return send_error(c, chan, EINVAL, "SIGNAL: bad signal %u", sig);
    struct proc *p = find_proc(c, chan);
    if (!p) {
        /* SIGNAL on a GET's channel cancels the transfer (the host stopped at its size cap). */
        struct xfer *x = find_xfer(c, chan);
        if (x && x->kind == X_GET) {
            close_fd(&x->fd);
            x->done = 1;
            return;
        }
        return send_error(c, chan, E_UNKNOWN_CHAN, "SIGNAL: no process on channel %u", chan);
    }
    if (signal_proc(p, (int)sig) < 0 && errno != ESRCH)
        send_error(c, chan, (uint32_t)errno, "SIGNAL: %s", strerror(errno));
}

/* Absolute, NUL-free (guaranteed by rd_str), shorter than PATH_MAX. */
static int path_ok(const char *path) { return path[0] == '/' && strlen(path) < PATH_MAX - 64; }

/* mkdir -p of every parent of path (and path itself when self is set). */
static int make_parents(const char *path, int self, mode_t self_mode) {
    char tmp[PATH_MAX];
    size_t n = strlen(path);
    if (n >= sizeof tmp) return errno = ENAMETOOLONG, -1;
    memcpy(tmp, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (tmp[i] != '/' && tmp[i] != 0) continue;
        if (tmp[i] == 0 && !self) break;
        char saved = tmp[i];
        tmp[i] = 0;
        if (mkdir(tmp, saved == 0 ? self_mode : 0755) < 0 && errno != EEXIST) return -1;
        tmp[i] = saved;
    }
    return 0;
}

static void xfer_free_done(void) {
    for (struct xfer **xp = &xfers; *xp;) {
        struct xfer *x = *xp;
        if (x->done) {
            *xp = x->next;
            close_fd(&x->fd);
            free(x->path);
            free(x->tmp);
            free(x);
        } else {
            xp = &x->next;
        }
    }
}

static struct xfer *xfer_new(struct conn *c, uint32_t chan, int kind) {
    int n = 0;
    for (struct xfer *x = xfers; x; x = x->next) n += x->conn == c && !x->done;
    if (n >= MAX_XFERS_PER_CONN) {
        send_error(c, chan, E_LIMIT, "too many transfers in flight");
        return NULL;
    }
    struct xfer *x = calloc(1, sizeof *x);
    if (!x) {
        send_error(c, chan, ENOMEM, "out of memory");
        return NULL;
    }
    x->conn = c;
    x->chan = chan;
    x->kind = kind;
    x->fd = -1;
    x->next = xfers;
    xfers = x;
    return x;
}

static void handle_put(struct conn *c, uint32_t chan, const uint8_t *pl, size_t len) {
    struct rd r = {pl, len, 0, 0};
    uint32_t mode = rd_u32(&r), kind = rd_u32(&r);
    const char *path = rd_str(&r);
    if (r.bad || r.pos != len || kind > PUT_DIR || mode > 07777)
        return send_error(c, chan, E_BAD_PAYLOAD, "PUT: malformed request");
    if (!path_ok(path)) return send_error(c, chan, EINVAL, "PUT: path must be absolute");
    if (find_proc(c, chan) || find_xfer(c, chan))
        return send_error(c, chan, E_CHAN_BUSY, "PUT: channel %u is in use", chan);
    if (kind == PUT_DIR) {
        if (make_parents(path, 1, (mode_t)mode) < 0)
            return send_error(c, chan, (uint32_t)errno, "PUT %s: %s", path, strerror(errno));
        struct stat st;
        if (stat(path, &st) < 0 || !S_ISDIR(st.st_mode))
            return send_error(c, chan, ENOTDIR, "PUT %s: not a directory", path);
        if (chmod(path, (mode_t)mode) < 0)
            return send_error(c, chan, (uint32_t)errno, "PUT %s: chmod: %s", path, strerror(errno));
        return send_ok(c, chan);
    }
    struct xfer *x = xfer_new(c, chan, X_PUT);
    if (!x) return;
    x->mode = (mode_t)mode;
    x->path = strdup(path);
    const char *slash = strrchr(path, '/');
    size_t dirlen = (size_t)(slash - path);
    size_t tmplen = strlen(path) + 48;
    x->tmp = malloc(tmplen);
    if (!x->path || !x->tmp) {
        x->failed = 1;
        return send_error(c, chan, ENOMEM, "PUT: out of memory");
    }
    snprintf(x->tmp, tmplen, "%.*s/.%s.ignition-%d-%u", (int)dirlen, path, slash + 1, (int)getpid(),
             ++tmp_counter);
    if (!slash[1] || make_parents(path, 0, 0) < 0 ||
        (x->fd = open(x->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600)) < 0) {
        int e = slash[1] ? errno : EISDIR;
        x->failed = 1;
        free(x->tmp);
        x->tmp = NULL;
        return send_error(c, chan, (uint32_t)e, "PUT %s: %s", path, strerror(e));
    }
}

static void put_abort(struct xfer *x, int e, const char *what) {
    send_error(x->conn, x->chan, (uint32_t)e, "PUT %s: %s: %s", x->path, what, strerror(e));
    close_fd(&x->fd);
    if (x->tmp) unlink(x->tmp);
    x->failed = 1;
}

static void handle_data(struct conn *c, uint32_t chan, const uint8_t *pl, size_t len) {
    struct xfer *x = find_xfer(c, chan);
    if (!x || x->kind != X_PUT)
        return send_error(c, chan, E_UNKNOWN_CHAN, "DATA: no PUT on channel %u", chan);
    if (len == 0) {
        x->done = 1;
        if (x->failed) return;
        if (fchmod(x->fd, x->mode) < 0) return put_abort(x, errno, "chmod");
        if (close(x->fd) < 0) {
            x->fd = -1;
            return put_abort(x, errno, "close");
        }
        x->fd = -1;
        if (rename(x->tmp, x->path) < 0) return put_abort(x, errno, "rename");
        return send_ok(c, chan);
    }
    if (x->failed) return;
    while (len) {
        ssize_t n = write(x->fd, pl, len);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return put_abort(x, n < 0 ? errno : EIO, "write");
        pl += n;
        len -= (size_t)n;
    }
}

/* Directory listing: entries packed into LIST frames of at most IG_CHUNK bytes. */
struct lister {
    struct conn *c;
    uint32_t chan;
    struct buf frame;
};

static void list_flush(struct lister *l) {
    if (buf_used(&l->frame)) send_frame(l->c, T_LIST, l->chan, l->frame.p + l->frame.off, buf_used(&l->frame));
    l->frame.off = l->frame.len = 0;
}

static void list_add(struct lister *l, const struct stat *st, const char *rel) {
    size_t n = strlen(rel) + 1;
    if (buf_used(&l->frame) + 12 + n > IG_CHUNK) list_flush(l);
    uint8_t h[12];
    put_le32(h, (uint32_t)st->st_mode);
    put_le64(h + 4, (uint64_t)st->st_size);
    if (buf_append(&l->frame, h, 12) < 0 || buf_append(&l->frame, rel, n) < 0) conn_fail(l->c, "out of memory");
}

static void walk(struct lister *l, char *path, size_t plen, size_t rel_at, int depth) {
    DIR *d = opendir(path);
    if (!d) return;
    struct dirent *de;
    while (!l->c->dead && (de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        size_t nlen = strlen(de->d_name);
        size_t sep = path[plen - 1] == '/' ? 0 : 1;
        if (plen + sep + nlen + 1 > PATH_MAX) continue;
        if (sep) path[plen] = '/';
        memcpy(path + plen + sep, de->d_name, nlen + 1);
        struct stat st;
        if (lstat(path, &st) == 0) {
            list_add(l, &st, path + rel_at);
            if (S_ISDIR(st.st_mode) && depth < MAX_WALK_DEPTH) walk(l, path, plen + sep + nlen, rel_at, depth + 1);
        }
        path[plen] = 0;
    }
    closedir(d);
}

static void handle_get(struct conn *c, uint32_t chan, const uint8_t *pl, size_t len) {
    struct rd r = {pl, len, 0, 0};
    const char *path = rd_str(&r);
    uint32_t flags = 0;
    if (!r.bad && r.pos != len) flags = rd_u32(&r);
    if (r.bad || r.pos != len || flags & ~GET_STAT_ONLY)
        return send_error(c, chan, E_BAD_PAYLOAD, "GET: malformed request");
    if (!path_ok(path)) return send_error(c, chan, EINVAL, "GET: path must be absolute");
    if (find_proc(c, chan) || find_xfer(c, chan))
        return send_error(c, chan, E_CHAN_BUSY, "GET: channel %u is in use", chan);
    struct stat st;
    int fd = -1;
    if (stat(path, &st) < 0) return send_error(c, chan, (uint32_t)errno, "GET %s: %s", path, strerror(errno));
    if (!(flags & GET_STAT_ONLY) && S_ISREG(st.st_mode)) {
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
        if (fd < 0) return send_error(c, chan, (uint32_t)errno, "GET %s: %s", path, strerror(errno));
    }
    uint8_t s[12];
    put_le32(s, (uint32_t)st.st_mode);
    put_le64(s + 4, (uint64_t)st.st_size);
    send_frame(c, T_STAT, chan, s, sizeof s);
    if (flags & GET_STAT_ONLY) return;
    if (fd >= 0) {
        struct xfer *x = xfer_new(c, chan, X_GET);
        if (!x) {
            close(fd);
            return;
        }
        x->fd = fd; /* streamed from the main loop as the output drains */
    } else if (S_ISDIR(st.st_mode)) {
        static char walkpath[PATH_MAX];
        size_t plen = strlen(path);
        while (plen > 1 && path[plen - 1] == '/') plen--;
        memcpy(walkpath, path, plen);
        walkpath[plen] = 0;
        struct lister l = {c, chan, {0}};
        walk(&l, walkpath, plen, plen == 1 ? 1 : plen + 1, 0);
        list_flush(&l);
        buf_free(&l.frame);
        send_frame(c, T_LIST, chan, NULL, 0);
    }
}

static void xfer_pump_get(struct xfer *x) {
    struct conn *c = x->conn;
    while (!x->done && !c->dead && buf_used(&c->out) < OUT_GET_HIGH) {
        size_t at;
        if (frame_begin(c, IG_CHUNK, &at) < 0) return;
        ssize_t n = read(x->fd, c->out.p + c->out.len, IG_CHUNK);
        if (n > 0) {
            c->out.len += (size_t)n;
            frame_end(c, at, T_DATA, x->chan);
            continue;
        }
        c->out.len = at;
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) send_error(c, x->chan, (uint32_t)errno, "GET: read: %s", strerror(errno));
        else send_frame(c, T_DATA, x->chan, NULL, 0);
        x->done = 1;
    }
}

static void handle_sync(struct conn *c, uint32_t chan, const uint8_t *pl, size_t len) {
    if (len < 8 + 32 || len > 8 + 4096) return send_error(c, chan, E_BAD_PAYLOAD, "SYNC: need 8 + 32..4096 bytes");
    uint64_t ns = get_le64(pl);
    size_t elen = len - 8;
    if (sync_dry_run) return send_ok(c, chan);
    struct timespec ts = {(time_t)(ns / 1000000000u), (long)(ns % 1000000000u)};
    if (clock_settime(CLOCK_REALTIME, &ts) < 0)
        return send_error(c, chan, (uint32_t)errno, "SYNC: clock_settime: %s", strerror(errno));
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return send_error(c, chan, (uint32_t)errno, "SYNC: /dev/urandom: %s", strerror(errno));
    /* Credit the bytes (RNDADDENTROPY) so an early-boot CRNG becomes ready; fall back to a plain
     * write, which mixes them in without credit. Then reseed now, not at the next interval. */
    struct {
        int entropy_count, buf_size;
        uint8_t buf[4096];
    } info;
    info.entropy_count = (int)(elen * 8);
    info.buf_size = (int)elen;
    memcpy(info.buf, pl + 8, elen);
    if (ioctl(fd, IG_RNDADDENTROPY, &info) < 0 && write(fd, pl + 8, elen) != (ssize_t)elen) {
        int e = errno;
        close(fd);
        return send_error(c, chan, (uint32_t)e, "SYNC: mixing entropy: %s", strerror(e));
    }
    if (ioctl(fd, IG_RNDRESEEDCRNG) < 0) {
        int e = errno;
        close(fd);
        return send_error(c, chan, (uint32_t)e, "SYNC: RNDRESEEDCRNG: %s", strerror(e));
    }
    close(fd);
    send_ok(c, chan);
}

/* ---------------------------------------------------------------- TCP tunnels */

/* A tunnel joins one channel to one TCP socket on the guest's 127.0.0.1 (docs/agent-protocol.md,
 * "TCP tunnels"). Each direction has a window: the agent buffers at most TUN_WINDOW bytes of host
 * data per tunnel and reads its socket only while the host has granted credit and the connection's
 * output is below OUT_HIGH, so a peer that floods or never reads stalls only its own tunnel. */
#define TUN_WINDOW (256u * 1024u)
#define TUN_MAX_CREDIT (16u << 20)
#define TUN_MAX_PER_CONN 256
#define TUN_PENDING_MAX 16 /* accepted connections waiting for ATTACH, per listener */
#define TUN_READS_PER_WAKEUP 16

enum tun_kind { TK_CONNECTING, TK_OPEN, TK_LISTEN, TK_PENDING };

struct tun {
    struct tun *next;
    struct conn *conn;
    uint32_t chan; /* TK_PENDING: its listener's channel */
    uint32_t id;   /* TK_PENDING: the conn_id announced in TCP_ACCEPT */
    int kind;
    int fd;
    int dead;
    unsigned port;
    struct buf inq;   /* host data not yet written to the socket (<= TUN_WINDOW) */
    uint64_t credit;  /* bytes the agent may still send to the host */
    uint32_t written; /* written to the socket since the last TCP_RCREDIT */
    int rd_eof;       /* TCP_EOF sent */
    int wr_shut;      /* TCP_SHUTDOWN received */
    int wr_done;      /* shutdown(SHUT_WR) done */
    int hup;          /* POLLHUP seen while not reading: do not poll again for input */
    int npending;     /* TK_LISTEN: accepted connections waiting for ATTACH */
    uint32_t next_id; /* TK_LISTEN */
};

static struct tun *tuns;

static struct tun *tun_find(struct conn *c, uint32_t chan) {
    for (struct tun *t = tuns; t; t = t->next)
        if (!t->dead && t->conn == c && t->chan == chan && t->kind != TK_PENDING) return t;
    return NULL;
}

static struct tun *tun_pending(struct conn *c, uint32_t listen_chan, uint32_t id) {
    for (struct tun *t = tuns; t; t = t->next)
        if (!t->dead && t->conn == c && t->kind == TK_PENDING && t->chan == listen_chan && t->id == id) return t;
    return NULL;
}

static int tun_busy(struct conn *c, uint32_t chan) { return find_proc(c, chan) || find_xfer(c, chan) || tun_find(c, chan); }

static int tun_count(struct conn *c) {
    int n = 0;
    for (struct tun *t = tuns; t; t = t->next) n += !t->dead && (!c || t->conn == c);
    return n;
}

static struct tun *tun_new(struct conn *c, uint32_t chan, int kind, int fd) {
    struct tun *t = calloc(1, sizeof *t);
    if (!t) return NULL;
    t->conn = c;
    t->chan = chan;
    t->kind = kind;
    t->fd = fd;
    t->next = tuns;
    tuns = t;
    return t;
}

static void tun_unpend(struct tun *p) {
    for (struct tun *l = tuns; l; l = l->next)
        if (!l->dead && l->conn == p->conn && l->kind == TK_LISTEN && l->chan == p->chan && l->npending > 0) {
            l->npending--;
            return;
        }
}

/* Close the socket (err != 0: with a reset, so the guest peer sees ECONNRESET) and forget it. */
static void tun_close(struct tun *t, int err) {
    if (t->dead) return;
    t->dead = 1;
    if (t->kind == TK_PENDING) tun_unpend(t);
    if (t->fd >= 0) {
        if (err && t->kind != TK_LISTEN) {
            struct linger lg = {1, 0};
            setsockopt(t->fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        }
        close_fd(&t->fd);
    }
    buf_free(&t->inq);
    if (t->kind == TK_LISTEN) /* its connections still waiting for ATTACH go with it */
        for (struct tun *p = tuns; p; p = p->next)
            if (!p->dead && p->conn == t->conn && p->kind == TK_PENDING && p->chan == t->chan) tun_close(p, ECONNRESET);
}

static void tun_finish(struct tun *t, int err) {
    uint8_t e[4];
    put_le32(e, (uint32_t)err);
    if (t->conn && !t->conn->dead) send_frame(t->conn, T_TCP_CLOSED, t->chan, e, 4);
    tun_close(t, err);
}

static void tun_maybe_done(struct tun *t) {
    if (!t->dead && t->rd_eof && t->wr_done && !buf_used(&t->inq)) tun_finish(t, 0);
}

static void tun_send_u32(struct tun *t, int type, uint32_t v) {
    uint8_t b[4];
    put_le32(b, v);
    send_frame(t->conn, type, t->chan, b, 4);
}

static int tun_socket_error(int fd) {
    int err = 0;
    socklen_t l = sizeof err;
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0) err = errno;
    return err;
}

static void tun_open(struct tun *t) {
    int one = 1;
    setsockopt(t->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    t->kind = TK_OPEN;
    tun_send_u32(t, T_TCP_CONNECTED, TUN_WINDOW);
}

/* Write queued host data to the socket; credit it back; half-close once asked and drained. */
static void tun_write(struct tun *t) {
    while (!t->dead && buf_used(&t->inq)) {
        ssize_t n = write(t->fd, t->inq.p + t->inq.off, buf_used(&t->inq));
        if (n > 0) {
            buf_consume(&t->inq, (size_t)n);
            t->written += (uint32_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        return tun_finish(t, n < 0 ? errno : EIO);
    }
    if (t->dead) return;
    buf_trim(&t->inq);
    /* Credit in quarters of the window, not per write: one small message each way then costs
     * one frame each way (the peer never waits: a full window means a quarter is written). */
    if (t->written >= TUN_WINDOW / 4) {
        tun_send_u32(t, T_TCP_RCREDIT, t->written);
        t->written = 0;
    }
    if (t->wr_shut && !t->wr_done && !buf_used(&t->inq)) {
        shutdown(t->fd, SHUT_WR);
        t->wr_done = 1;
        tun_maybe_done(t);
    }
}

static int tun_can_read(struct tun *t) {
    return t->kind == TK_OPEN && !t->rd_eof && t->credit > 0 && buf_used(&t->conn->out) < OUT_HIGH;
}

static void tun_read(struct tun *t) {
    struct conn *c = t->conn;
    for (int i = 0; i < TUN_READS_PER_WAKEUP && !t->dead && !c->dead && tun_can_read(t); i++) {
        size_t at, want = t->credit < IG_CHUNK ? (size_t)t->credit : IG_CHUNK;
        if (frame_begin(c, want, &at) < 0) return;
        ssize_t n = read(t->fd, c->out.p + c->out.len, want);
        if (n > 0) {
            c->out.len += (size_t)n;
            frame_end(c, at, T_TCP_RDATA, t->chan);
            t->credit -= (uint64_t)n;
            continue;
        }
        c->out.len = at;
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
        if (n < 0) return tun_finish(t, errno);
        t->rd_eof = 1;
        send_frame(c, T_TCP_EOF, t->chan, NULL, 0);
        return tun_maybe_done(t);
    }
}

static int tun_loopback_socket(unsigned port, struct sockaddr_in *a) {
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    a->sin_port = htons((uint16_t)port);
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
#ifdef IGNITION_FUZZ
    return errno = ECONNREFUSED, -1; /* fuzzed requests never reach real sockets */
#else
    return socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
#endif
}

static int tun_check_new(struct conn *c, uint32_t chan, const char *what) {
    if (tun_busy(c, chan)) {
        send_error(c, chan, E_CHAN_BUSY, "%s: channel %u is in use", what, chan);
        return -1;
    }
    if (tun_count(c) >= TUN_MAX_PER_CONN) {
        send_error(c, chan, E_LIMIT, "%s: too many tunnels", what);
        return -1;
    }
    return 0;
}

static void handle_tcp_connect(struct conn *c, uint32_t chan, const uint8_t *pl, size_t len) {
    if (len != 8) return send_error(c, chan, E_BAD_PAYLOAD, "TCP_CONNECT: payload must be 8 bytes");
    uint32_t port = get_le32(pl), window = get_le32(pl + 4);
    if (port < 1 || port > 65535 || window < 1) return send_error(c, chan, E_BAD_PAYLOAD, "TCP_CONNECT: bad port/window");
    if (tun_check_new(c, chan, "TCP_CONNECT") < 0) return;
    struct sockaddr_in a;
    int fd = tun_loopback_socket(port, &a);
    if (fd < 0) return send_error(c, chan, (uint32_t)errno, "TCP_CONNECT: socket: %s", strerror(errno));
    int r = connect(fd, (struct sockaddr *)&a, sizeof a);
    if (r < 0 && errno != EINPROGRESS) {
        int e = errno;
        close(fd);
        return send_error(c, chan, (uint32_t)e, "connect 127.0.0.1:%u: %s", port, strerror(e));
    }
    struct tun *t = tun_new(c, chan, TK_CONNECTING, fd);
    if (!t) {
        close(fd);
        return send_error(c, chan, ENOMEM, "TCP_CONNECT: out of memory");
    }
    t->port = port;
    t->credit = window > TUN_MAX_CREDIT ? TUN_MAX_CREDIT : window;
    if (r == 0) tun_open(t);
}

static void tun_on_connect(struct tun *t) {
    int err = tun_socket_error(t->fd);
    if (!err) return tun_open(t);
    send_error(t->conn, t->chan, (uint32_t)err, "connect 127.0.0.1:%u: %s", t->port, strerror(err));
    tun_close(t, 0);
}

static void handle_tcp_listen(struct conn *c, uint32_t chan, const uint8_t *pl, size_t len) {
    if (len != 4) return send_error(c, chan, E_BAD_PAYLOAD, "TCP_LISTEN: payload must be 4 bytes");
    uint32_t port = get_le32(pl);
    if (port < 1 || port > 65535) return send_error(c, chan, E_BAD_PAYLOAD, "TCP_LISTEN: bad port %u", port);
    if (tun_check_new(c, chan, "TCP_LISTEN") < 0) return;
    struct sockaddr_in a;
    int fd = tun_loopback_socket(port, &a), one = 1;
    if (fd < 0) return send_error(c, chan, (uint32_t)errno, "TCP_LISTEN: socket: %s", strerror(errno));
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 64) < 0) {
        int e = errno;
        close(fd);
        return send_error(c, chan, (uint32_t)e, "listen on 127.0.0.1:%u: %s", port, strerror(e));
    }
    struct tun *t = tun_new(c, chan, TK_LISTEN, fd);
    if (!t) {
        close(fd);
        return send_error(c, chan, ENOMEM, "TCP_LISTEN: out of memory");
    }
    t->port = port;
    send_ok(c, chan);
}

static void tun_accept(struct tun *l) {
    while (!l->dead && l->npending < TUN_PENDING_MAX) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != ECONNABORTED) logmsg("accept on 127.0.0.1:%u: %s", l->port, strerror(errno));
            return;
        }
        struct tun *p = tun_count(l->conn) < TUN_MAX_PER_CONN ? tun_new(l->conn, l->chan, TK_PENDING, fd) : NULL;
        if (!p) {
            struct linger lg = {1, 0};
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            close(fd);
            continue;
        }
        p->id = ++l->next_id;
        p->port = l->port;
        l->npending++;
        uint8_t b[4];
        put_le32(b, p->id);
        send_frame(l->conn, T_TCP_ACCEPT, l->chan, b, 4);
    }
}

static void handle_tcp_attach(struct conn *c, uint32_t chan, const uint8_t *pl, size_t len) {
    if (len != 12) return send_error(c, chan, E_BAD_PAYLOAD, "TCP_ATTACH: payload must be 12 bytes");
    uint32_t lchan = get_le32(pl), id = get_le32(pl + 4), window = get_le32(pl + 8);
    if (window < 1) return send_error(c, chan, E_BAD_PAYLOAD, "TCP_ATTACH: zero window");
    if (tun_busy(c, chan)) return send_error(c, chan, E_CHAN_BUSY, "TCP_ATTACH: channel %u is in use", chan);
    struct tun *p = tun_pending(c, lchan, id);
    if (!p) return send_error(c, chan, E_UNKNOWN_CHAN, "TCP_ATTACH: no connection %u waiting on channel %u", id, lchan);
    tun_unpend(p);
    p->chan = chan;
    p->credit = window > TUN_MAX_CREDIT ? TUN_MAX_CREDIT : window;
    tun_open(p);
}

static void handle_tcp_reject(struct conn *c, uint32_t chan, const uint8_t *pl, size_t len) {
    if (len != 8) return send_error(c, chan, E_BAD_PAYLOAD, "TCP_REJECT: payload must be 8 bytes");
    struct tun *p = tun_pending(c, chan, get_le32(pl));
    if (p) tun_close(p, get_le32(pl + 4) ? (int)get_le32(pl + 4) : ECONNREFUSED);
}

/* DATA/CREDIT/SHUTDOWN/CLOSE may cross the agent's TCP_CLOSED: for a channel without a tunnel
 * they are dropped without an answer. */
static void tun_frame(struct conn *c, int type, uint32_t chan, const uint8_t *pl, size_t len) {
    switch (type) {
    case T_TCP_CONNECT: return handle_tcp_connect(c, chan, pl, len);
    case T_TCP_LISTEN: return handle_tcp_listen(c, chan, pl, len);
    case T_TCP_ATTACH: return handle_tcp_attach(c, chan, pl, len);
    case T_TCP_REJECT: return handle_tcp_reject(c, chan, pl, len);
    default: break;
    }
    struct tun *t = tun_find(c, chan);
    switch (type) {
    case T_TCP_DATA:
        if (!t || !len) return;
        if (t->kind != TK_OPEN || t->wr_shut) return send_error(c, chan, E_BAD_PAYLOAD, "TCP_DATA: channel %u is not open for writing", chan);
        if (buf_used(&t->inq) + len > TUN_WINDOW) {
            send_error(c, chan, E_LIMIT, "TCP_DATA: window of %u bytes exceeded", TUN_WINDOW);
            return tun_finish(t, ENOBUFS);
        }
        if (buf_append(&t->inq, pl, len) < 0) return tun_finish(t, ENOMEM);
        return tun_write(t);
    case T_TCP_CREDIT:
        if (len != 4) return send_error(c, chan, E_BAD_PAYLOAD, "TCP_CREDIT: payload must be 4 bytes");
        if (t && t->kind == TK_OPEN) {
            t->credit += get_le32(pl);
            if (t->credit > TUN_MAX_CREDIT) t->credit = TUN_MAX_CREDIT;
        }
        return;
    case T_TCP_SHUTDOWN:
        if (t && t->kind == TK_OPEN && !t->wr_shut) {
            t->wr_shut = 1;
            tun_write(t);
        }
        return;
    case T_TCP_CLOSE:
        if (len != 4) return send_error(c, chan, E_BAD_PAYLOAD, "TCP_CLOSE: payload must be 4 bytes");
        if (t) tun_close(t, (int)get_le32(pl));
        return;
    default: return send_error(c, chan, E_UNKNOWN_TYPE, "unknown frame type 0x%02x", type);
    }
}

/* The host session ended: reset every guest connection and close every listener. */
static void tun_drop_conn(struct conn *c) {
    for (struct tun *t = tuns; t; t = t->next)
        if (!t->dead && t->conn == c) tun_close(t, ECONNRESET);
}

static void handle_frame(struct conn *c, int type, uint32_t chan, const uint8_t *pl, size_t len) {
    switch (type) {
    case T_PING: return send_frame(c, T_PONG, chan, pl, len);
    case T_EXEC: return handle_exec(c, chan, pl, len);
    case T_STDIN: return handle_stdin(c, chan, pl, len);
    case T_SIGNAL: return handle_signal(c, chan, pl, len);
    case T_PUT: return handle_put(c, chan, pl, len);
    case T_DATA: return handle_data(c, chan, pl, len);
    case T_GET: return handle_get(c, chan, pl, len);
    case T_SYNC: return handle_sync(c, chan, pl, len);
    case T_WINSIZE: return handle_winsize(c, chan, pl, len);
    case T_RESET:
        /* A new host session on a stream that cannot signal disconnects reliably (virtio-serial
         * reconnects can be too quick to observe): forget the old session's work. */
        conn_drop_work(c);
        return send_frame(c, T_PONG, chan, pl, len);
    default:
        if (type >= 0x10 && type <= 0x1F) return tun_frame(c, type, chan, pl, len);
        return send_error(c, chan, E_UNKNOWN_TYPE, "unknown frame type 0x%02x", type);
    }
}

/* Decode and handle every complete frame in c->in. */
static void conn_parse(struct conn *c) {
    while (!c->dead) {
        size_t avail = buf_used(&c->in);
        if (c->skip) {
            size_t k = avail < c->skip ? avail : (size_t)c->skip;
            buf_consume(&c->in, k);
            c->skip -= k;
            if (c->skip) return;
            continue;
        }
        if (avail < 2) return;
        const uint8_t *p = c->in.p + c->in.off; /* not before: p is NULL while the buffer is empty */
        if (p[0] != IG_MAGIC0 || p[1] != IG_MAGIC1) {
            if (!c->resyncing) send_error(c, 0, E_BAD_MAGIC, "bad magic: skipping to the next frame");
            c->resyncing = 1;
            size_t i = 1;
            while (i + 1 < avail && !(p[i] == IG_MAGIC0 && p[i + 1] == IG_MAGIC1)) i++;
            if (i + 1 >= avail && p[avail - 1] != IG_MAGIC0) i = avail; /* keep a trailing 'I' */
            buf_consume(&c->in, i);
            continue;
        }
        if (avail < IG_HEADER) return;
        unsigned version = p[2], type = p[3];
        uint32_t chan = get_le32(p + 4), len = get_le32(p + 8);
        if (version != IG_VERSION) {
            if (!c->resyncing) send_error(c, chan, E_BAD_VERSION, "unsupported version %u", version);
            c->resyncing = 1;
            buf_consume(&c->in, 2);
            continue;
        }
        c->resyncing = 0;
        if (len > IG_MAX_PAYLOAD) {
            send_error(c, chan, E_TOO_LARGE, "payload of %u bytes exceeds %u", len, IG_MAX_PAYLOAD);
            buf_consume(&c->in, IG_HEADER);
            c->skip = len;
            continue;
        }
        if (avail < IG_HEADER + (size_t)len) return;
        handle_frame(c, type, chan, p + IG_HEADER, len);
        if (c->dead || !buf_used(&c->in)) return; /* a serial reset may have cleared the input */
        buf_consume(&c->in, IG_HEADER + (size_t)len);
    }
}

static size_t conn_stdin_pending(struct conn *c) {
    size_t n = 0;
    for (struct proc *p = procs; p; p = p->next)
        if (p->conn == c) n += buf_used(&p->inq);
    return n;
}

static int conn_wants_input(struct conn *c) {
    return buf_used(&c->out) < OUT_STOP_INPUT && conn_stdin_pending(c) < STDIN_STOP_INPUT;
}

/* Read and handle what the transport has, a bounded number of reads per wakeup (a virtio-serial
 * read returns one 4 KiB buffer at a time, so one read per poll would be slow). */
static void conn_on_readable(struct conn *c) {
    for (int i = 0; i < 64 && !c->dead && conn_wants_input(c); i++) {
        if (buf_reserve(&c->in, IG_CHUNK) < 0) return conn_fail(c, "out of memory");
        ssize_t n = read(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        if (n <= 0) return conn_fail(c, n < 0 ? strerror(errno) : "peer went away");
        c->in.len += (size_t)n;
        c->session_active = 1;
        conn_parse(c);
    }
    buf_trim(&c->in);
}

/* ---------------------------------------------------------------- transports */

static struct conn *conn_new(int fd, int kind) {
    struct conn *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->fd = fd;
    c->kind = kind;
    c->next = conns;
    conns = c;
    return c;
}

static void listener_open(struct listener *l) {
    int fd;
    if (l->is_vsock) {
        fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        struct ig_sockaddr_vm a = {0};
        a.svm_family = AF_VSOCK;
        a.svm_port = l->port;
        a.svm_cid = IG_VMADDR_CID_ANY;
        if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && listen(fd, 16) == 0) {
            l->fd = fd;
            INFO("listening on vsock port %u", l->port);
            return;
        }
    } else {
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        if (strlen(l->path) >= sizeof a.sun_path) {
            logmsg("unix socket path too long: %s", l->path);
            exit(2);
        }
        strcpy(a.sun_path, l->path);
        unlink(l->path);
        if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 && listen(fd, 16) == 0) {
            l->fd = fd;
            return;
        }
    }
    if (!l->warned) INFO("%s unavailable (%s); retrying quietly", l->is_vsock ? "vsock" : l->path, strerror(errno));
    l->warned = 1;
    if (fd >= 0) close(fd);
    l->retry_at = now_ms() + RETRY_MS;
}

static void listener_accept(struct listener *l) {
    for (;;) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != ECONNABORTED) logmsg("accept: %s", strerror(errno));
            return;
        }
        int n = 0;
        for (struct conn *c = conns; c; c = c->next) n += c->kind == CK_SOCKET && !c->dead;
        if (n >= MAX_CONNS || !conn_new(fd, CK_SOCKET)) {
            logmsg("too many connections; refusing one");
            close(fd);
        }
    }
}

/* Find /dev/vportNpM whose sysfs name is serial_name (there is no udev in the guest). */
static int serial_find(char *out, size_t outlen) {
    if (serial_path_opt) {
        snprintf(out, outlen, "%s", serial_path_opt);
        return 0;
    }
    DIR *d = opendir("/sys/class/virtio-ports");
    if (!d) return -1;
    struct dirent *de;
    int found = -1;
    while (found < 0 && (de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char p[300], name[256];
        snprintf(p, sizeof p, "/sys/class/virtio-ports/%s/name", de->d_name);
        int fd = open(p, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t n = read(fd, name, sizeof name - 1);
        close(fd);
        if (n <= 0) continue;
        name[n] = 0;
        name[strcspn(name, "\n")] = 0;
        if (!strcmp(name, serial_name)) {
            snprintf(out, outlen, "/dev/%s", de->d_name);
            found = 0;
        }
    }
    closedir(d);
    return found;
}

static void serial_open(void) {
    char path[300];
    int fd = -1;
    if (serial_find(path, sizeof path) == 0) fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        if (!serial_warned) INFO("virtio-serial port %s unavailable; retrying quietly", serial_name ? serial_name : serial_path_opt);
        serial_warned = 1;
        serial_retry_at = now_ms() + RETRY_MS;
        return;
    }
    serial_conn = conn_new(fd, CK_SERIAL);
    if (!serial_conn) {
        close(fd);
        serial_retry_at = now_ms() + RETRY_MS;
        return;
    }
    /* A virtio-serial host never sees the guest end close: tell it an agent (re)started, so a
     * host waiting on the dead agent's requests knows at once. */
    send_error(serial_conn, 0, E_STARTED, "agent started");
    INFO("serving on %s", path);
}

/* ---------------------------------------------------------------- main loop */

static void on_sigchld(int sig) {
    (void)sig;
    int e = errno;
    ssize_t w = write(sigchld_pipe[1], "c", 1);
    (void)w;
    errno = e;
}

enum { PS_SIGCHLD, PS_LISTENER, PS_CONN, PS_OUT, PS_ERR, PS_IN, PS_TUN };
struct slot {
    int type;
    void *obj;
};

/* TCP tunnels in the poll set (see "TCP tunnels" above). */
static size_t tun_poll_add(struct pollfd *pfd, struct slot *slots, size_t n) {
    for (struct tun *t = tuns; t; t = t->next) {
        if (t->dead || !t->conn || t->conn->dead) continue;
        short ev = 0;
        if (t->kind == TK_CONNECTING) ev = POLLOUT;
        else if (t->kind == TK_LISTEN) ev = t->npending < TUN_PENDING_MAX ? POLLIN : 0;
        else if (t->kind == TK_OPEN) {
            if (tun_can_read(t) && !t->hup) ev |= POLLIN;
            if (buf_used(&t->inq) || (t->wr_shut && !t->wr_done)) ev |= POLLOUT;
        }
        if (!ev) continue;
        pfd[n].fd = t->fd;
        pfd[n].events = ev;
        pfd[n].revents = 0;
        slots[n].type = PS_TUN;
        slots[n].obj = t;
        n++;
    }
    return n;
}

static void tun_on_poll(struct tun *t, int fd, short re) {
    if (t->dead || t->fd != fd || !t->conn || t->conn->dead) return;
    if (t->kind == TK_CONNECTING) return tun_on_connect(t);
    if (t->kind == TK_LISTEN) return tun_accept(t);
    if (t->kind != TK_OPEN) return;
    if (re & POLLERR) {
        int err = tun_socket_error(t->fd);
        return tun_finish(t, err ? err : ECONNRESET);
    }
    if (re & POLLOUT) tun_write(t);
    if (!t->dead && (re & (POLLIN | POLLHUP))) {
        if (tun_can_read(t)) tun_read(t);
        else t->hup = 1;
    }
}

/* A peer that hung up while the tunnel could not read still has data or its EOF waiting. */
static void tun_pump(void) {
    for (struct tun *t = tuns; t; t = t->next)
        if (!t->dead && t->hup && t->conn && !t->conn->dead && tun_can_read(t)) tun_read(t);
}

static void tun_sweep(void) {
    for (struct tun **tp = &tuns; *tp;) {
        struct tun *t = *tp;
        if (t->dead) {
            *tp = t->next;
            free(t);
        } else {
            tp = &t->next;
        }
    }
}

static void sweep(void) {
    for (struct conn **cp = &conns; *cp;) {
        struct conn *c = *cp;
        if (c->dead) {
            *cp = c->next;
            close(c->fd);
            buf_free(&c->in);
            buf_free(&c->out);
            free(c);
        } else {
            cp = &c->next;
        }
    }
    for (struct proc **pp = &procs; *pp;) {
        struct proc *p = *pp;
        if (p->done) {
            *pp = p->next;
            close_fd(&p->in_fd);
            close_fd(&p->out_fd);
            close_fd(&p->err_fd);
            buf_free(&p->inq);
            free(p);
        } else {
            pp = &p->next;
        }
    }
    xfer_free_done();
    tun_sweep();
}

static void usage(void) {
    fputs("usage: ignition-agent [--vsock PORT] [--serial-name NAME] [--serial-path PATH]\n"
          "                      [--listen-unix PATH] [--sync-dry-run] [--verbose]\n",
          stderr);
    exit(2);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--sync-dry-run")) {
            sync_dry_run = 1;
            continue;
        }
        if (!strcmp(a, "--verbose")) {
            verbose = 1;
            continue;
        }
        if (i + 1 >= argc) usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--vsock")) {
            char *end;
            unsigned long port = strtoul(v, &end, 10);
            if (*end || !*v || port > 0xFFFFFFFFul) usage();
            have_vsock = 1;
            lst_vsock.is_vsock = 1;
            lst_vsock.port = (unsigned)port;
        } else if (!strcmp(a, "--serial-name")) {
            serial_name = v;
        } else if (!strcmp(a, "--serial-path")) {
            serial_path_opt = v;
        } else if (!strcmp(a, "--listen-unix")) {
            have_unix = 1;
            lst_unix.path = v;
        } else {
            usage();
        }
    }
    if (!have_vsock && !have_unix && !serial_name && !serial_path_opt) usage();

    /* Keep 0-2 occupied so no pipe or socket lands there and gets clobbered in a child. */
    for (;;) {
        int fd = open("/dev/null", O_RDWR);
        if (fd < 0 || fd > 2) {
            if (fd > 2) close(fd);
            break;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    if (pipe2(sigchld_pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
        logmsg("pipe: %s", strerror(errno));
        return 1;
    }
    struct sigaction sa = {0};
    sa.sa_handler = on_sigchld;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);

    if (have_unix) listener_open(&lst_unix);
    if (have_vsock) listener_open(&lst_vsock);
    if (serial_name || serial_path_opt) serial_open();

    struct pollfd *pfd = NULL;
    struct slot *slots = NULL;
    size_t cap = 0;
    for (;;) {
        int64_t now = now_ms();
        reap_children();
        /* timeouts, retries and pending work that needs no event */
        int64_t wake = -1;
#define WAKE_AT(t) \
    do { \
        int64_t t_ = (t); \
        if (wake < 0 || t_ < wake) wake = t_; \
    } while (0)
        for (struct proc *p = procs; p; p = p->next) {
            if (p->done || p->reaped || !p->deadline) continue;
            if (!p->timed_out && now >= p->deadline) {
                p->timed_out = 1;
                signal_proc(p, SIGKILL);
            } else if (!p->timed_out) {
                WAKE_AT(p->deadline);
            }
        }
        struct listener *ls[2] = {have_unix ? &lst_unix : NULL, have_vsock ? &lst_vsock : NULL};
        for (int i = 0; i < 2; i++) {
            if (!ls[i] || ls[i]->fd >= 0) continue;
            if (now >= ls[i]->retry_at) listener_open(ls[i]);
            if (ls[i]->fd < 0) WAKE_AT(ls[i]->retry_at);
        }
        if ((serial_name || serial_path_opt) && !serial_conn) {
            if (now >= serial_retry_at) serial_open();
            if (!serial_conn) WAKE_AT(serial_retry_at);
        }
        for (struct xfer *x = xfers; x; x = x->next)
            if (x->kind == X_GET && !x->done && x->conn && !x->conn->dead) xfer_pump_get(x);
        tun_pump();
        for (struct conn *c = conns; c; c = c->next) conn_flush(c);
        sweep();

        /* build the poll set */
        size_t need = 3;
        for (struct conn *c = conns; c; c = c->next) need++;
        for (struct proc *p = procs; p; p = p->next) need += 3;
        need += (size_t)tun_count(NULL);
        if (need > cap) {
            cap = need * 2;
            struct pollfd *np = realloc(pfd, cap * sizeof *pfd);
            if (np) pfd = np;
            struct slot *ns = realloc(slots, cap * sizeof *slots);
            if (ns) slots = ns;
            if (!np || !ns) {
                logmsg("out of memory");
                return 1;
            }
        }
        size_t n = 0;
#define ADD(fd_, ev_, type_, obj_) \
    do { \
        pfd[n].fd = (fd_); \
        pfd[n].events = (short)(ev_); \
        pfd[n].revents = 0; \
        slots[n].type = (type_); \
        slots[n].obj = (obj_); \
        n++; \
    } while (0)
        ADD(sigchld_pipe[0], POLLIN, PS_SIGCHLD, NULL);
        for (int i = 0; i < 2; i++)
            if (ls[i] && ls[i]->fd >= 0) ADD(ls[i]->fd, POLLIN, PS_LISTENER, ls[i]);
        for (struct conn *c = conns; c; c = c->next) {
            if (c->kind == CK_SERIAL && now < c->backoff_until) {
                WAKE_AT(c->backoff_until);
                continue;
            }
            short ev = (conn_wants_input(c) ? POLLIN : 0) | (buf_used(&c->out) ? POLLOUT : 0);
            for (struct xfer *x = xfers; x; x = x->next) /* a GET waits for the output to drain */
                if (x->conn == c && x->kind == X_GET && !x->done) ev |= POLLOUT;
            if (ev) ADD(c->fd, ev, PS_CONN, c);
        }
        for (struct proc *p = procs; p; p = p->next) {
            int room = p->conn && buf_used(&p->conn->out) < OUT_HIGH;
            if (room && p->out_fd >= 0) ADD(p->out_fd, POLLIN, PS_OUT, p);
            if (room && p->err_fd >= 0) ADD(p->err_fd, POLLIN, PS_ERR, p);
            if (p->in_fd >= 0 && (buf_used(&p->inq) || p->in_close)) ADD(p->in_fd, POLLOUT, PS_IN, p);
        }
        n = tun_poll_add(pfd, slots, n);
        int timeout = -1;
        if (wake >= 0) timeout = wake <= now ? 0 : (int)(wake - now > 60000 ? 60000 : wake - now);
        int r = poll(pfd, n, timeout);
        if (r < 0) {
            if (errno == EINTR) continue;
            logmsg("poll: %s", strerror(errno));
            return 1;
        }
        for (size_t i = 0; i < n; i++) {
            short re = pfd[i].revents;
            if (!re) continue;
            switch (slots[i].type) {
            case PS_SIGCHLD: {
                char drain[64];
                while (read(sigchld_pipe[0], drain, sizeof drain) > 0) {
                }
                reap_children();
                break;
            }
            case PS_LISTENER: listener_accept(slots[i].obj); break;
            case PS_CONN: {
                struct conn *c = slots[i].obj;
                if (c->dead) break;
                if (re & POLLOUT) conn_flush(c);
                if (re & (POLLIN | POLLHUP | POLLERR)) {
                    if (c->kind == CK_SOCKET && (re & (POLLHUP | POLLERR)) && !(re & POLLIN)) conn_fail(c, "hangup");
                    else conn_on_readable(c);
                }
                break;
            }
            case PS_OUT:
            case PS_ERR: {
                struct proc *p = slots[i].obj;
                int *fd = slots[i].type == PS_OUT ? &p->out_fd : &p->err_fd;
                if (*fd >= 0 && pfd[i].fd == *fd) {
                    pump_output(p, fd, slots[i].type == PS_OUT ? T_STDOUT : T_STDERR);
                    proc_maybe_finish(p);
                }
                break;
            }
            case PS_TUN: tun_on_poll(slots[i].obj, pfd[i].fd, re); break;
            case PS_IN: {
                struct proc *p = slots[i].obj;
                if (p->in_fd < 0 || pfd[i].fd != p->in_fd) break;
                if (re & (POLLERR | POLLHUP)) {
                    close_fd(&p->in_fd);
                    buf_free(&p->inq);
                } else {
                    proc_write_stdin(p);
                }
                break;
            }
            }
        }
    }
}
