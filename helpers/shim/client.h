/* Client role: the program's connect() to the SuT gets the kept connection. */
#ifndef FDKEEPER_CLIENT_H
#define FDKEEPER_CLIENT_H

#include <sys/socket.h>
#include "shim.h"

SHIM_HIDDEN int client_connect(int fd, const struct sockaddr *addr, socklen_t len);

#endif
