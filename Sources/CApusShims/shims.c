#define _GNU_SOURCE
#include <fcntl.h>
#include <spawn.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/prctl.h>
#include "CApusShims.h"

int apus_pipe_cloexec(int fds[2]) {
    return pipe2(fds, O_CLOEXEC);
}

int apus_spawn_file_actions_addchdir(posix_spawn_file_actions_t *actions, const char *path) {
    return posix_spawn_file_actions_addchdir_np(actions, path);
}

int apus_spawn_file_actions_addclosefrom(posix_spawn_file_actions_t *actions, int from) {
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 34))
    return posix_spawn_file_actions_addclosefrom_np(actions, from);
#else
    (void)actions;
    (void)from;
    return 0;  // older C libraries: descriptors without FD_CLOEXEC stay inherited
#endif
}

int apus_epoll_create(void) {
    return epoll_create1(EPOLL_CLOEXEC);
}

int apus_epoll_add(int epfd, int fd, uint32_t events, uint64_t data) {
    struct epoll_event event = {.events = events, .data = {.u64 = data}};
    return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &event);
}

int apus_epoll_remove(int epfd, int fd) {
    struct epoll_event event = {0};
    return epoll_ctl(epfd, EPOLL_CTL_DEL, fd, &event);
}

int apus_epoll_wait(int epfd, apus_event *events, int max, int timeout_ms) {
    struct epoll_event raw[512];
    if (max > 512) max = 512;
    int n = epoll_wait(epfd, raw, max, timeout_ms);
    for (int i = 0; i < n; i++) {
        events[i].events = raw[i].events;
        events[i].data = raw[i].data.u64;
    }
    return n;
}

int apus_accept(int fd) {
    return accept4(fd, 0, 0, SOCK_NONBLOCK | SOCK_CLOEXEC);
}

int apus_eventfd(void) {
    return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
}

long apus_read(int fd, void *buffer, unsigned long count) {
    // recvfrom rather than read: the socket call skips the file layer's checks and notifications.
    return syscall(SYS_recvfrom, fd, buffer, count, 0, (void *)0, (void *)0);
}

long apus_send(int fd, const void *buffer, unsigned long count) {
    return syscall(SYS_sendto, fd, buffer, count, MSG_NOSIGNAL, (void *)0, 0);
}

// Ambient capabilities are per thread and pass to every program a thread executes. An unprivileged apusd is granted
// CAP_NET_ADMIN as an ambient capability (systemd's AmbientCapabilities=); it must keep it for itself and lend it
// only to its network commands, so the ambient set is emptied here, before main and before any other thread
// exists (threads inherit the set of the thread that makes them). Permitted and effective sets are left alone.
__attribute__((constructor)) static void apus_clear_ambient_capabilities(void) {
    (void)prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
}

int apus_ambient_capability(int raise, int capability) {
    return prctl(PR_CAP_AMBIENT, raise ? PR_CAP_AMBIENT_RAISE : PR_CAP_AMBIENT_LOWER, capability, 0, 0);
}
