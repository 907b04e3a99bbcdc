// Small C shims for GNU extensions that Swift's Glibc module does not export.
#ifndef C_APUS_SHIMS_H
#define C_APUS_SHIMS_H
#include <spawn.h>

/// pipe2(fds, O_CLOEXEC): both ends close-on-exec from the start, so no concurrent spawn inherits them.
int apus_pipe_cloexec(int fds[2]);
/// posix_spawn_file_actions_addchdir_np: the child changes directory before exec.
int apus_spawn_file_actions_addchdir(posix_spawn_file_actions_t *actions, const char *path);

#endif
