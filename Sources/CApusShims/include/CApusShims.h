// Small C shims for GNU extensions that Swift's Glibc module does not export.
#ifndef C_APUS_SHIMS_H
#define C_APUS_SHIMS_H
#include <spawn.h>
#include <stdint.h>
#include <sys/epoll.h>

/// pipe2(fds, O_CLOEXEC): both ends close-on-exec from the start, so no concurrent spawn inherits them.
int apus_pipe_cloexec(int fds[2]);
/// posix_spawn_file_actions_addchdir_np: the child changes directory before exec.
int apus_spawn_file_actions_addchdir(posix_spawn_file_actions_t *actions, const char *path);

/// posix_spawn_file_actions_addclosefrom_np: the child closes every descriptor from `from` up (after the dup2s),
/// so it inherits no descriptor another thread opened without FD_CLOEXEC (such as a pipe of a concurrent
/// Foundation `Process`). A no-op before glibc 2.34.
int apus_spawn_file_actions_addclosefrom(posix_spawn_file_actions_t *actions, int from);

/// Raises (`raise` != 0) or lowers `capability` in the calling thread's ambient set: a program this thread executes
/// meanwhile inherits it (it must be in the permitted and inheritable sets). The ambient set of every thread starts
/// empty: a constructor clears it when the program loads.
int apus_ambient_capability(int raise, int capability);

/// epoll for the HTTP/1.1 edge reactor (Swift's Glibc module does not export <sys/epoll.h>).
/// One readiness event: `data` is what the descriptor was registered with.
typedef struct apus_event {
    uint32_t events;
    uint64_t data;
} apus_event;

static const uint32_t APUS_EV_IN = EPOLLIN;
static const uint32_t APUS_EV_OUT = EPOLLOUT;
static const uint32_t APUS_EV_ERR = EPOLLERR;
static const uint32_t APUS_EV_HUP = EPOLLHUP;
static const uint32_t APUS_EV_RDHUP = EPOLLRDHUP;
static const uint32_t APUS_EV_ET = EPOLLET;
static const uint32_t APUS_EV_EXCLUSIVE = EPOLLEXCLUSIVE;

/// epoll_create1(EPOLL_CLOEXEC).
int apus_epoll_create(void);
/// EPOLL_CTL_ADD of `fd` for `events`, reported with `data`.
int apus_epoll_add(int epfd, int fd, uint32_t events, uint64_t data);
/// EPOLL_CTL_DEL of `fd`.
int apus_epoll_remove(int epfd, int fd);
/// epoll_wait into an unpacked array (at most 512 events).
int apus_epoll_wait(int epfd, apus_event *events, int max, int timeout_ms);
/// accept4 with SOCK_NONBLOCK | SOCK_CLOEXEC; the peer's address is not asked for.
int apus_accept(int fd);
/// A non-blocking, close-on-exec eventfd (for waking a reactor thread).
int apus_eventfd(void);

/// recv(2) and send(2) with MSG_NOSIGNAL for the reactor's non-blocking sockets, as plain system calls: the C
/// library's wrappers are thread-cancellation points and switch the cancellation state around every call, which
/// the reactor (whose threads are never cancelled) pays for on every read and write. -1 with errno set on failure.
long apus_read(int fd, void *buffer, unsigned long count);
long apus_send(int fd, const void *buffer, unsigned long count);

#endif
