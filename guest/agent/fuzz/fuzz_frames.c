/* libFuzzer harness for the guest agent's frame parser and request decoders (guest/agent/agent.c).
 *
 * agent.c is included whole, with its main() renamed, so the fuzzer drives the real conn_parse()
 * -> handle_frame() -> handle_exec/put/get/... code. The input is one byte stream from the host
 * (split into two reads at a point the first byte picks, to exercise partial frames). Side effects
 * are contained: fork() fails (exec requests are decoded in full, nothing runs), every path the
 * agent touches is re-rooted under a scratch directory that is emptied after each input, and the
 * clock is never set (--sync-dry-run). Oracle, besides ASan/UBSan: every byte the agent queues for
 * the host must be a well-formed frame no larger than IG_MAX_PAYLOAD.
 *
 * Build and run: make -C guest/agent/fuzz run FUZZ_SECONDS=600 (see the Makefile there). */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
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

static char fz_root[64];
static char fz_buf[4][PATH_MAX + 128];
static int fz_touched;

/* Re-root an agent path under the scratch dir (slot: distinct buffers for two-path calls). */
static const char *fz_path(const char *p, int slot) {
    snprintf(fz_buf[slot], sizeof fz_buf[slot], "%s%s", fz_root, p);
    return fz_buf[slot];
}
static int fz_open(const char *p, int fl, ...) {
    if (fl & O_CREAT) fz_touched = 1;
    return open(strcmp(p, "/dev/null") ? fz_path(p, 0) : p, fl, 0600);
}
static int fz_mkdir(const char *p, mode_t m) {
    fz_touched = 1;
    return mkdir(fz_path(p, 0), m | 0700);
}
static int fz_rename(const char *a, const char *b) { return rename(fz_path(a, 0), fz_path(b, 1)); }
static pid_t fz_fork(void) { return errno = EAGAIN, -1; }

/* Walk (GET of a directory) keeps its own copy of the path and hands it to opendir/lstat. */
#define open fz_open
#define mkdir fz_mkdir
#define rename fz_rename
#define fork fz_fork
#define stat(p, b) stat(fz_path(p, 0), b)
#define lstat(p, b) lstat(fz_path(p, 0), b)
#define chmod(p, m) chmod(fz_path(p, 0), (m) | 0700)
#define fchmod(fd, m) fchmod(fd, (m) | 0600)
#define unlink(p) unlink(fz_path(p, 2))
#define opendir(p) opendir(fz_path(p, 3))
#define chdir(p) chdir(fz_path(p, 0))
#define clock_settime(c, t) 0
#define main ignition_agent_main
#define IGNITION_FUZZ 1 /* agent.c: fuzzed tunnel requests never open real sockets */
#include "../agent.c"
#undef main
#undef stat
#undef lstat
#undef unlink
#undef open
#undef mkdir
#undef rename

static int fz_rm(const char *p, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    if (ftw->level > 0) remove(p);
    return 0;
}

/* Every queued output byte must be part of a well-formed frame. */
static void check_output(const struct buf *b) {
    size_t n = buf_used(b);
    if (!n) return;
    const uint8_t *p = b->p + b->off;
    while (n) {
        if (n < IG_HEADER || p[0] != IG_MAGIC0 || p[1] != IG_MAGIC1 || p[2] != IG_VERSION) abort();
        uint32_t len = get_le32(p + 8);
        if (len > IG_MAX_PAYLOAD || n - IG_HEADER < len) abort();
        p += IG_HEADER + len;
        n -= IG_HEADER + len;
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    snprintf(fz_root, sizeof fz_root, "/tmp/agent-fuzz-scratch-%d", (int)getpid());
    if (mkdir(fz_root, 0700) < 0 && errno != EEXIST) abort();
    sync_dry_run = 1;
    signal(SIGPIPE, SIG_IGN);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1 || size > 4 * IG_MAX_PAYLOAD) return 0;
    int kind = data[0] & 1 ? CK_SERIAL : CK_SOCKET;
    size_t split = size > 1 ? 1 + (size_t)(data[0] >> 1) * (size - 1) / 128 : 1;
    struct conn *c = conn_new(-1, kind);
    if (!c) return 0;
    c->logged = MAX_LOGGED_ERRORS; /* the protocol-error log line would drown libFuzzer's output */
    const uint8_t *parts[2] = {data + 1, data + split};
    size_t lens[2] = {split - 1, size - split};
    for (int i = 0; i < 2 && !c->dead; i++) {
        if (buf_append(&c->in, parts[i], lens[i]) < 0) break;
        conn_parse(c);
        for (struct xfer *x = xfers; x; x = x->next)
            if (x->kind == X_GET && !x->done && x->conn == c) xfer_pump_get(x);
        check_output(&c->out);
        c->out.off = c->out.len = 0; /* the host took it */
    }
    conn_drop_work(c);
    c->dead = 1;
    sweep(); /* frees the connection, its buffers and transfers */
    if (conns || procs || xfers) abort();
    if (fz_touched) nftw(fz_root, fz_rm, 16, FTW_DEPTH | FTW_PHYS);
    fz_touched = 0;
    return 0;
}
