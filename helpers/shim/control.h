/* Client side of the keeper's control socket (docs/protocol.md). */
#ifndef FDKEEPER_CONTROL_H
#define FDKEEPER_CONTROL_H

#include "shim.h"

enum ctl_status {
    CTL_OK = 0,
    CTL_UNREACHABLE, /* could not connect to the control socket; sys_errno set */
    CTL_TIMEOUT,     /* the keeper did not answer in time */
    CTL_ERR,         /* the keeper answered ERR; code and text set */
    CTL_PROTO,       /* the reply made no sense; text says why */
};

struct ctl_result {
    enum ctl_status status;
    int sys_errno;
    char code[32];
    char text[4100];
    int *fds; /* malloc'ed, nfds descriptors (close-on-exec), in id order */
    int nfds;
    /* malloc'ed, one per descriptor: FDS peers=/locals= (len 0 where not sent) */
    struct shim_inaddr *peers, *locals;
    int keep; /* the OK said keep=1: the process may keep a copy for the same request (leasecache.h) */
};

/* Send one request on this process's control connection (opened at its first
 * request, kept open for the next: control.c) and collect the reply
 * `OK count=N` + FDS packets carrying N descriptors (or ERR), with the
 * packets' peers=/locals= addresses when present. */
SHIM_HIDDEN void ctl_lease(const char *path, const char *request, struct ctl_result *res);
/* Free res->fds, peers, locals (closing any descriptors still in it when close_them). */
SHIM_HIDDEN void ctl_result_free(struct ctl_result *res, int close_them);

/* Seconds the shim waits for the keeper's reply. */
#define CTL_TIMEOUT_SECONDS 60

#endif
