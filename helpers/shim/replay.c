/* Which of the program's socket options the kept connection takes (see
 * replay.h): one rule, kept apart from handoff.c so that a test can build it
 * alone and hold it against the ptrace mode's twin. */
#include <netinet/in.h>
#include <sys/socket.h>

#include "replay.h"

static int is_about_own_socket(int level, int name)
{
    return level == SOL_SOCKET && (name == SO_LINGER || name == SO_REUSEADDR
#ifdef SO_REUSEPORT
                                   || name == SO_REUSEPORT
#endif
                                  );
}

int handoff_replays_option(int level, int name, int pair)
{
    return !is_about_own_socket(level, name) && !(pair && level == IPPROTO_TCP);
}
