// Small C shims for GNU extensions that Swift's Glibc module does not export.
#ifndef C_APUS_SHIMS_H
#define C_APUS_SHIMS_H
#include <spawn.h>

/// pipe2(fds, O_CLOEXEC): both ends close-on-exec from the start, so no concurrent spawn inherits them.
int apus_pipe_cloexec(int fds[2]);
/// posix_spawn_file_actions_addchdir_np: the child changes directory before exec.
int apus_spawn_file_actions_addchdir(posix_spawn_file_actions_t *actions, const char *path);

/// posix_spawn_file_actions_addclosefrom_np: the child closes every descriptor from `from` up (after the dup2s),
/// so it inherits no descriptor another thread opened without FD_CLOEXEC (such as a pipe of a concurrent
/// Foundation `Process`). A no-op before glibc 2.34.
int apus_spawn_file_actions_addclosefrom(posix_spawn_file_actions_t *actions, int from);

#endif
