/* Lease latency probe for bench/lease_latency.py.
 *
 * Times N connect() calls to ADDR:PORT, one fresh TCP socket each. Run with the fdkeeper
 * shim preloaded and FDKEEPER_SOCKET set, each connect() is a lease: the request to the
 * keeper, the descriptor received and dup3'd onto the socket. Run without FDKEEPER_SOCKET
 * (the shim inert), each connect() is a plain loopback TCP connect, for comparison.
 * Prints one latency in nanoseconds per line.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s IPV4 PORT COUNT\n", argv[0]);
        return 2;
    }
    struct sockaddr_in sut = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    inet_pton(AF_INET, argv[1], &sut.sin_addr);
    int count = atoi(argv[3]);
    for (int i = 0; i < count; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        long long start = now_ns();
        if (connect(fd, (struct sockaddr *)&sut, sizeof sut) != 0) {
            perror("connect");
            return 1;
        }
        long long elapsed = now_ns() - start;
        printf("%lld\n", elapsed);
        close(fd);
    }
    return 0;
}
