/* The lab's raw relay (issue 21): the CPU floor of moving a payload through
 * a room, against which blockswarm's CPU per byte is judged. The hosts form
 * a chain, server -> h1 -> h2 -> ... -> hN: each host downloads the payload
 * once and uploads it once (the last one only downloads), the bytes a swarm
 * moves. Per block of BLOCK bytes a host does what a minimal relay must:
 * one recv into a buffer, one pwrite to its target, one sendfile from the
 * target's page cache to the next host. No hashing, no protocol.
 *
 *   relay serve FILE LISTEN_IP PORT BLOCK
 *   relay host LISTEN_IP PORT UP_IP UP_PORT TARGET SIZE BLOCK last|relay
 *
 * Built by scripts/lab (cc -O2). Exit status 0 once SIZE bytes are written
 * (and passed on); any error is fatal with a message. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "relay: %s: %s\n", what, strerror(errno));
    exit(1);
}

static struct sockaddr_in addr(const char *ip, const char *port) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(port))};
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
        fprintf(stderr, "relay: bad address %s\n", ip);
        exit(2);
    }
    return a;
}

static int listen_on(const char *ip, const char *port) {
    struct sockaddr_in a = addr(ip, port);
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    if (s < 0) die("socket");
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
    if (listen(s, 4) < 0) die("listen");
    return s;
}

static int accept_one(int l) {
    int s = accept(l, NULL, NULL);
    if (s < 0) die("accept");
    close(l);
    return s;
}

/* The upstream may not listen yet: retried for 60 s. */
static int connect_to(const char *ip, const char *port) {
    struct sockaddr_in a = addr(ip, port);
    for (int i = 0; i < 6000; i++) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0) die("socket");
        if (connect(s, (struct sockaddr *)&a, sizeof a) == 0) return s;
        close(s);
        struct timespec t = {0, 10 * 1000 * 1000};
        nanosleep(&t, NULL);
    }
    die("connect");
    return -1;
}

static void send_file(int sock, int fd, off_t off, size_t n) {
    while (n > 0) {
        ssize_t k = sendfile(sock, fd, &off, n);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) die("sendfile");
        n -= k;
    }
}

int main(int argc, char **argv) {
    if (argc == 6 && !strcmp(argv[1], "serve")) {
        size_t block = strtoul(argv[5], NULL, 10);
        int fd = open(argv[2], O_RDONLY);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) < 0) die(argv[2]);
        int s = accept_one(listen_on(argv[3], argv[4]));
        for (off_t off = 0; off < st.st_size; off += block) {
            size_t n = st.st_size - off < (off_t)block ? st.st_size - off : block;
            send_file(s, fd, off, n);
        }
        close(s);
        return 0;
    }
    if (argc != 10 || strcmp(argv[1], "host")) {
        fprintf(stderr, "usage: relay serve FILE IP PORT BLOCK | "
                        "relay host IP PORT UP_IP UP_PORT TARGET SIZE BLOCK last|relay\n");
        return 2;
    }
    int last = !strcmp(argv[9], "last");
    off_t size = strtoll(argv[7], NULL, 10);
    size_t block = strtoul(argv[8], NULL, 10);
    int fd = open(argv[6], O_RDWR);
    if (fd < 0) die(argv[6]);
    int l = last ? -1 : listen_on(argv[2], argv[3]);
    int up = connect_to(argv[4], argv[5]);
    int lowat = block;
    /* One wake-up per block, not per segment. */
    setsockopt(up, SOL_SOCKET, SO_RCVLOWAT, &lowat, sizeof lowat);
    int down = last ? -1 : accept_one(l);
    char *buf = malloc(block);
    if (!buf) die("malloc");
    for (off_t off = 0; off < size;) {
        size_t want = size - off < (off_t)block ? size - off : block, got = 0;
        while (got < want) {
            ssize_t k = recv(up, buf + got, want - got, MSG_WAITALL);
            if (k < 0 && errno == EINTR) continue;
            if (k < 0) die("recv");
            if (k == 0) {
                fprintf(stderr, "relay: upstream closed at byte %lld\n", (long long)(off + got));
                return 1;
            }
            got += k;
        }
        for (size_t w = 0; w < want;) {
            ssize_t k = pwrite(fd, buf + w, want - w, off + w);
            if (k < 0 && errno == EINTR) continue;
            if (k <= 0) die("pwrite");
            w += k;
        }
        if (down >= 0) send_file(down, fd, off, want);
        off += want;
    }
    if (down >= 0) close(down);
    return 0;
}
