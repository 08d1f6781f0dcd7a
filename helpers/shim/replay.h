/* Which socket options the program set go onto the kept connection at the
 * handoff. Pure logic, twin of replays_option in fdkeeper/modes/ptrace/
 * services.py (tests/parity/ checks both on the same inputs). */
#ifndef FDKEEPER_REPLAY_H
#define FDKEEPER_REPLAY_H

#include "shim.h"

/* 1 when option (level, name) is set again on the kept connection; pair: the
 * kept fd is a socketpair end the keeper relays (TLS), which has no TCP
 * options. Not replayed: those about the program's own socket's address and
 * closing (SO_LINGER, SO_REUSEADDR, SO_REUSEPORT). */
SHIM_HIDDEN int handoff_replays_option(int level, int name, int pair);

#endif
