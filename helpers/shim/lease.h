/* The lease exchange with the keeper: request, reply, and what a failure tells the user. */
#ifndef FDKEEPER_LEASE_H
#define FDKEEPER_LEASE_H

#include "control.h"

/* transport= of a LEASE, or NULL when FDKEEPER_TRANSPORT is unusable: then
 * the handoff `what` does not happen (said once per process). */
SHIM_HIDDEN const char *lease_transport(const char *what);
/* Send the LEASE request; 0 with res holding the reply's descriptors, or -1
 * after one stderr line, errno set from the keeper's code (res freed). */
SHIM_HIDDEN int lease_request(const char *request, struct ctl_result *res, const char *what);
/* A reply that made no sense (text: why): as lease_request's failure. */
SHIM_HIDDEN int lease_bad_reply(struct ctl_result *res, const char *why, const char *what);
/* Is the descriptor the keeper handed a socketpair end it relays (TLS),
 * rather than an AF_INET/AF_INET6 socket? When in doubt: no. */
SHIM_HIDDEN int lease_is_pair(int fd);

#endif
