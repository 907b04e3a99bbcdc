// apus-sandbox-init: the last step before a function's own code runs, and the first after apusd spawns it.
//
// Options are applied in the order given, then the command after `--` is executed in place of this process:
//   --cgroup FILE      write "0" to FILE (a cgroup.procs file): this process, and all it starts, joins that cgroup
//   --userns FILE      join the user namespace FILE names (/proc/PID/ns/user of a namespace holder, below); the
//                      process is then root inside it, with every capability there and none on the host. Before
//                      --netns: a namespace made by an unprivileged apusd belongs to its user namespace
//   --netns FILE       join the network namespace FILE names (/run/netns/NAME made by a root apusd, or
//                      /proc/PID/ns/net of a namespace holder)
//   --hold             (alone) make a new user namespace and a new network namespace, say "ready" on standard
//                      output, then wait until standard input ends (apusd closed it, or died) and exit: how an unprivileged
//                      apusd keeps a namespace pair alive for one instance (apusd writes the holder's uid/gid maps
//                      with newuidmap/newgidmap and links its network namespace to the host)
//   --default-route IP add a default route via IP (IPv4) in the current network namespace: egress for the instance
//                      (needs CAP_NET_ADMIN: before --uid); without it the namespace reaches only its own link
//   --gid N            drop supplementary groups, set real/effective/saved gid to N
//   --uid N            set real/effective/saved uid to N (after --gid); every capability goes with it
//   --drop-caps        empty the capability bounding and ambient sets (needs CAP_SETPCAP: before --uid)
//   --no-new-privs     PR_SET_NO_NEW_PRIVS: no setuid binary or file capability can give privileges back
//   --seccomp          install the instance filter (see seccomp_filter below); implies --no-new-privs
//   --wait             stop reading options; read the command from standard input instead of after `--`, then
//                      run it with standard input on /dev/null. The input is NUL-terminated strings: the argv (the
//                      first an absolute path), an empty string, the environment (`KEY=VALUE`), then end of input.
//
// `--wait` is how apusd keeps sandbox slots ready: processes that have already joined a spare cgroup (a join costs
// an RCU grace period, milliseconds to tens of them, when no other join happened just before) and wait for the
// instance they will become, as prewarmed Python processes wait for their function.
//
// apusd runs it twice per instance: outside the sandbox as apusd's user (`--cgroup ... [--userns ...] --netns ...`,
// so the instance is counted from its first instruction and never sees the host's network; an unprivileged apusd
// adds --userns, so bubblewrap runs as root of the instance's user namespace only), and inside bubblewrap
// (`[--default-route IP] --drop-caps --gid N --uid N --seccomp`), so the function never
// runs as root, never holds a capability and cannot make the system calls a server has no use for.
// Any failure is fatal: the instance must not start with a layer missing.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <grp.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <sched.h>
#include <sys/socket.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/sched.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static void die(const char *what, const char *detail) {
    fprintf(stderr, "apus-sandbox-init: %s%s%s: %s\n", what, detail ? " " : "", detail ? detail : "", strerror(errno));
    exit(127);
}

static long number(const char *text, const char *option) {
    char *end = NULL;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || value < 0 || value > 0x7fffffffL) {
        errno = EINVAL;
        die(option, text);
    }
    return value;
}

static void join_cgroup(const char *path) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) die("cannot open", path);
    if (write(fd, "0\n", 2) != 2) die("cannot join cgroup", path);
    close(fd);
}

static void join_user_namespace(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("cannot open user namespace", path);
    if (setns(fd, CLONE_NEWUSER) < 0) die("cannot join user namespace", path);
    close(fd);
    // Root of the namespace (its uid 0 maps to apusd's uid): programs executed from here keep their capabilities
    // in the namespace, and the inner apus-sandbox-init can later switch to the instance's uid.
    if (setresgid(0, 0, 0) < 0) die("cannot become gid 0 in user namespace", path);
    if (setresuid(0, 0, 0) < 0) die("cannot become uid 0 in user namespace", path);
}

// --hold: a user namespace and a network namespace that live as long as this process (or a process in them).
static void hold_namespaces(void) {
    // No parent-death signal: it would fire when the apusd thread that started the holder ends. Standard input
    // is a pipe only apusd holds, so it ends when apusd closes it or dies.
    if (unshare(CLONE_NEWUSER | CLONE_NEWNET) < 0) die("cannot make a user and a network namespace", NULL);
    if (write(1, "ready\n", 6) != 6) die("cannot say ready", NULL);
    char buffer[64];
    for (;;) {
        ssize_t n = read(0, buffer, sizeof buffer);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) exit(0);
    }
}

static void join_network_namespace(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("cannot open network namespace", path);
    if (setns(fd, CLONE_NEWNET) < 0) die("cannot join network namespace", path);
    close(fd);
}

// RTM_NEWROUTE for 0.0.0.0/0 via `gateway` in the main table, acknowledged by the kernel.
static void add_default_route(const char *gateway) {
    struct in_addr via;
    if (inet_pton(AF_INET, gateway, &via) != 1) { errno = EINVAL; die("--default-route: not an IPv4 address:", gateway); }
    struct {
        struct nlmsghdr header;
        struct rtmsg route;
        char attributes[64];
    } request;
    memset(&request, 0, sizeof request);
    request.header.nlmsg_len = NLMSG_LENGTH(sizeof(struct rtmsg));
    request.header.nlmsg_type = RTM_NEWROUTE;
    request.header.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    request.header.nlmsg_seq = 1;
    request.route.rtm_family = AF_INET;
    request.route.rtm_dst_len = 0;
    request.route.rtm_table = RT_TABLE_MAIN;
    request.route.rtm_protocol = RTPROT_BOOT;
    request.route.rtm_scope = RT_SCOPE_UNIVERSE;
    request.route.rtm_type = RTN_UNICAST;
    struct rtattr *attribute = (struct rtattr *)((char *)&request + NLMSG_ALIGN(request.header.nlmsg_len));
    attribute->rta_type = RTA_GATEWAY;
    attribute->rta_len = RTA_LENGTH(sizeof via);
    memcpy(RTA_DATA(attribute), &via, sizeof via);
    request.header.nlmsg_len = NLMSG_ALIGN(request.header.nlmsg_len) + RTA_ALIGN(attribute->rta_len);

    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd < 0) die("cannot open a netlink socket", NULL);
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    if (sendto(fd, &request, request.header.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel) < 0) die("cannot send the route", NULL);
    char answer[512];
    ssize_t n = recv(fd, answer, sizeof answer, 0);
    if (n < (ssize_t)NLMSG_LENGTH(sizeof(struct nlmsgerr))) die("no answer from netlink for the route", NULL);
    struct nlmsghdr *reply = (struct nlmsghdr *)answer;
    if (reply->nlmsg_type != NLMSG_ERROR) { errno = EPROTO; die("unexpected netlink answer for the route", NULL); }
    struct nlmsgerr *outcome = NLMSG_DATA(reply);
    if (outcome->error != 0) { errno = -outcome->error; die("cannot add the default route via", gateway); }
    close(fd);
}

static void drop_capabilities(void) {
    // The bounding set first (CAP_SETPCAP is still held), then the ambient set.
    for (int cap = 0; cap <= 63; cap++) {
        if (prctl(PR_CAPBSET_READ, cap, 0, 0, 0) < 0) break;  // past the last capability this kernel knows
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL) die("cannot drop capability", NULL);
    }
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL) die("cannot clear ambient capabilities", NULL);
}

static void clear_capability_sets(void) {
    struct __user_cap_header_struct header = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    if (syscall(SYS_capset, &header, data) < 0) die("cannot clear capabilities", NULL);
}

// Denied with EPERM: what a server never needs and what breaks out of a sandbox or into the kernel.
static const int denied[] = {
    SYS_mount, SYS_umount2, SYS_pivot_root, SYS_chroot, SYS_swapon, SYS_swapoff, SYS_reboot,
    SYS_open_by_handle_at, SYS_name_to_handle_at,
    SYS_ptrace, SYS_process_vm_readv, SYS_process_vm_writev,
    SYS_kexec_load, SYS_kexec_file_load, SYS_init_module, SYS_finit_module, SYS_delete_module,
    SYS_bpf, SYS_perf_event_open, SYS_userfaultfd,
    SYS_keyctl, SYS_add_key, SYS_request_key,
    SYS_unshare, SYS_setns,
    SYS_acct, SYS_quotactl, SYS_settimeofday, SYS_clock_settime, SYS_clock_adjtime, SYS_adjtimex,
    SYS_sethostname, SYS_setdomainname, SYS_iopl, SYS_ioperm, SYS_lookup_dcookie, SYS_syslog,
    SYS_fsopen, SYS_fsconfig, SYS_fsmount, SYS_fspick, SYS_move_mount, SYS_open_tree, SYS_mount_setattr,
    SYS_vhangup, SYS_nfsservctl, SYS_uselib,
    SYS_io_uring_setup, SYS_io_uring_enter, SYS_io_uring_register,
};

#define NAMESPACE_FLAGS (CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWCGROUP)
#define X32_SYSCALL_BIT 0x40000000u

// The filter, instruction by instruction (jumps are forward offsets from the next instruction):
//   0  load arch                         5  if nr == clone  -> 6, else -> 8
//   1  if arch == x86_64 -> 3            6  load args[0] (clone's flags, low 32 bits)
//   2  kill the process                  7  if flags & namespace flags -> EPERM, else -> ALLOW
//   3  load nr                           8  if nr == clone3 -> ENOSYS (its flags are in memory the filter cannot
//   4  if nr >= x32 bit -> ENOSYS           read; libc then falls back to clone)
//   9…  one test per denied call -> EPERM;  then ALLOW, EPERM, ENOSYS
static void install_seccomp(void) {
    enum { denied_count = sizeof denied / sizeof denied[0] };
    enum { first_denied = 9, allow = first_denied + denied_count, eperm = allow + 1, enosys = allow + 2 };
    struct sock_filter program[enosys + 1];
#define AT(index, instruction) (program[index] = (struct sock_filter)instruction)
#define TO(from, target) ((unsigned char)((target) - (from) - 1))
    AT(0, BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)));
    AT(1, BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, TO(1, 3), TO(1, 2)));
    AT(2, BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
    AT(3, BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)));
    AT(4, BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, X32_SYSCALL_BIT, TO(4, enosys), TO(4, 5)));
    AT(5, BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone, TO(5, 6), TO(5, 8)));
    AT(6, BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0])));
    AT(7, BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, NAMESPACE_FLAGS, TO(7, eperm), TO(7, allow)));
    AT(8, BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clone3, TO(8, enosys), TO(8, 9)));
    for (int i = 0; i < denied_count; i++) {
        int at = first_denied + i;
        AT(at, BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)denied[i], TO(at, eperm), TO(at, at + 1)));
    }
    AT(allow, BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
    AT(eperm, BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)));
    AT(enosys, BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA)));
#undef AT
#undef TO
    struct sock_fprog fprog = {.len = (unsigned short)(enosys + 1), .filter = program};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) die("cannot set no_new_privs", NULL);
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &fprog) < 0) die("cannot install the seccomp filter", NULL);
}

// Reads the whole of standard input (at most 1 MiB) and executes the command it names; never returns.
static void exec_from_stdin(void) {
    enum { max_input = 1 << 20, max_strings = 16384 };
    char *input = malloc(max_input + 1);
    char **argv = calloc(max_strings + 1, sizeof(char *));
    char **envp = calloc(max_strings + 1, sizeof(char *));
    if (!input || !argv || !envp) die("out of memory", NULL);
    size_t length = 0;
    for (;;) {
        ssize_t n = read(0, input + length, max_input - length);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("cannot read the command", NULL);
        if (n == 0) break;
        length += (size_t)n;
        if (length == max_input) { errno = E2BIG; die("command too long", NULL); }
    }
    if (length == 0) exit(0);  // apusd closed the slot without using it (it is stopping)
    input[length] = '\0';
    size_t argc = 0, envc = 0, at = 0;
    int in_env = 0;
    while (at < length) {
        char *string = input + at;
        size_t size = strlen(string);
        at += size + 1;
        if (!in_env && size == 0) { in_env = 1; continue; }
        if (in_env) {
            if (envc == max_strings) { errno = E2BIG; die("environment too long", NULL); }
            envp[envc++] = string;
        } else {
            if (argc == max_strings) { errno = E2BIG; die("command too long", NULL); }
            argv[argc++] = string;
        }
    }
    if (argc == 0 || argv[0][0] != '/') { errno = EINVAL; die("the command must start with an absolute path", NULL); }
    int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null < 0 || dup2(null, 0) < 0) die("cannot open /dev/null", NULL);
    close(null);
    execve(argv[0], argv, envp);
    die("cannot execute", argv[0]);
}

int main(int argc, char **argv) {
    int i = 1;
    long uid = -1, gid = -1;
    for (; i < argc; i++) {
        const char *option = argv[i];
        if (strcmp(option, "--") == 0) { i++; break; }
        if (strcmp(option, "--cgroup") == 0 && i + 1 < argc) {
            join_cgroup(argv[++i]);
        } else if (strcmp(option, "--userns") == 0 && i + 1 < argc) {
            join_user_namespace(argv[++i]);
        } else if (strcmp(option, "--hold") == 0 && argc == 2) {
            hold_namespaces();
        } else if (strcmp(option, "--netns") == 0 && i + 1 < argc) {
            join_network_namespace(argv[++i]);
        } else if (strcmp(option, "--default-route") == 0 && i + 1 < argc) {
            add_default_route(argv[++i]);
        } else if (strcmp(option, "--gid") == 0 && i + 1 < argc) {
            gid = number(argv[++i], option);
            if (setgroups(0, NULL) < 0) die("cannot drop supplementary groups", NULL);
            if (setresgid((gid_t)gid, (gid_t)gid, (gid_t)gid) < 0) die("cannot set gid", argv[i]);
        } else if (strcmp(option, "--uid") == 0 && i + 1 < argc) {
            uid = number(argv[++i], option);
            if (uid == 0) { errno = EINVAL; die("refusing to run an instance as uid", "0"); }
            if (setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) < 0) die("cannot set uid", argv[i]);
            clear_capability_sets();
        } else if (strcmp(option, "--drop-caps") == 0) {
            drop_capabilities();
        } else if (strcmp(option, "--no-new-privs") == 0) {
            if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) die("cannot set no_new_privs", NULL);
        } else if (strcmp(option, "--seccomp") == 0) {
            install_seccomp();
        } else if (strcmp(option, "--wait") == 0) {
            exec_from_stdin();
        } else {
            errno = EINVAL;
            die("unknown option or missing value:", option);
        }
    }
    (void)gid;
    if (i >= argc) {
        errno = EINVAL;
        die("usage: apus-sandbox-init --hold | [--cgroup FILE]... [--userns FILE] [--netns FILE] [--default-route IP] [--drop-caps] [--gid N] [--uid N] [--no-new-privs] [--seccomp] (-- COMMAND [ARG]... | --wait)", NULL);
    }
    execvp(argv[i], &argv[i]);
    die("cannot execute", argv[i]);
    return 127;
}
