/* The kernel's part of a forking sandbox start, without Python (issue 16, benchmarks/README.md
 * "The sandbox and the runtime per session, again"): what the sandbox zygote's monitor and the
 * session's pid 1 ask of the kernel, in C, so that the figure is the floor of the system calls
 * alone. Built and run by sandbox_bench.py where a C compiler exists.
 *
 *   sandbox_floor LEVEL N UID EMPTY SRC=DEST...
 *
 * Per session (N of them, one after the other): fork (level 0: the child exits at once);
 * level 1 adds what the monitor does (setgroups/setresgid/setresuid to UID, unshare of user,
 * mount, pid, net, ipc, uts and cgroup namespaces, setgroups deny, the uid/gid maps, the
 * hostname); level 2 adds the fork of the sandbox's pid 1; level 3 adds bubblewrap's mount
 * tree in pid 1 (a tmpfs base and pivot_root, each SRC bound read-only at DEST, two covers of
 * EMPTY, /proc, a /dev tmpfs with six device binds and devpts, two size-capped tmpfs, five
 * read-only file binds, the read-only remounts, the old root detached, a second pivot_root).
 * The parent reaps each session before the next; its CPU is read by the caller (RUSAGE_CHILDREN).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void die(const char *what) {
  dprintf(2, "sandbox_floor: %s: %s\n", what, strerror(errno));
  _exit(1);
}

static void write_file(const char *path, const char *text) {
  int fd = open(path, O_WRONLY);
  if (fd < 0 || write(fd, text, strlen(text)) < 0) die(path);
  close(fd);
}

static void ensure(const char *path, int dir) {
  char buf[4096];
  snprintf(buf, sizeof buf, "%s", path);
  for (char *p = buf + 1; *p; p++)
    if (*p == '/') {
      *p = 0;
      mkdir(buf, 0755);
      *p = '/';
    }
  if (dir) {
    mkdir(buf, 0755);
  } else {
    int fd = open(buf, O_WRONLY | O_CREAT, 0444);
    if (fd >= 0) close(fd);
  }
}

static void bind(const char *src, const char *dest, int readonly) {
  char host[4096], target[4096];
  struct stat st;
  snprintf(host, sizeof host, "/oldroot%s", src);
  snprintf(target, sizeof target, "/newroot%s", dest);
  if (stat(host, &st)) die(host);
  ensure(target, S_ISDIR(st.st_mode));
  if (mount(host, target, NULL, MS_BIND | MS_REC | MS_SILENT, NULL)) die(target);
  unsigned long flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_SILENT;
  if (readonly) flags |= MS_RDONLY | MS_NODEV;
  if (mount(NULL, target, NULL, flags, NULL)) die("remount");
}

static void mount_tree(int nbinds, char **binds, const char *empty) {
  static const char *devices[] = {"/dev/null", "/dev/zero", "/dev/full",
                                  "/dev/random", "/dev/urandom", "/dev/tty"};
  if (mount(NULL, "/", NULL, MS_SLAVE | MS_REC | MS_SILENT, NULL)) die("make / a slave");
  if (mount("tmpfs", "/tmp", "tmpfs", MS_NODEV | MS_NOSUID, NULL)) die("base tmpfs");
  if (chdir("/tmp") || mkdir("newroot", 0755) || mkdir("oldroot", 0755)) die("base dirs");
  if (syscall(SYS_pivot_root, ".", "oldroot")) die("pivot_root");
  if (chdir("/")) die("chdir");
  if (mount("newroot", "newroot", NULL, MS_BIND | MS_REC | MS_SILENT, NULL)) die("newroot");
  for (int i = 0; i < nbinds; i++) {
    char pair[4096];
    snprintf(pair, sizeof pair, "%s", binds[i]);
    char *eq = strchr(pair, '=');
    if (!eq) die("SRC=DEST expected");
    *eq = 0;
    bind(pair, eq + 1, 1);
  }
  bind(empty, "/cover/one", 1);
  bind(empty, "/cover/two", 1);
  ensure("/newroot/proc", 1);
  if (mount("proc", "/newroot/proc", "proc", MS_NOSUID | MS_NOEXEC | MS_NODEV, NULL)) die("proc");
  ensure("/newroot/dev", 1);
  if (mount("tmpfs", "/newroot/dev", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")) die("dev");
  for (int i = 0; i < 6; i++) bind(devices[i], devices[i], 0);
  for (int i = 0; i < 6; i++) {
    char link[64];
    snprintf(link, sizeof link, "/newroot/dev/link%d", i);
    if (symlink("/proc/self/fd", link)) die("symlink");
  }
  ensure("/newroot/dev/pts", 1);
  ensure("/newroot/dev/shm", 1);
  ensure("/newroot/tmp", 1);
  if (mount("devpts", "/newroot/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=620"))
    die("devpts");
  if (mount("tmpfs", "/newroot/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=1048576"))
    die("shm");
  if (mount("tmpfs", "/newroot/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=1048576")) die("tmp");
  for (int i = 0; i < 5; i++) {
    char staged[64], target[64];
    snprintf(staged, sizeof staged, "/bindfile%d", i);
    snprintf(target, sizeof target, "/newroot/cape-files/f%d", i);
    int fd = open(staged, O_WRONLY | O_CREAT | O_EXCL, 0444);
    if (fd < 0 || write(fd, "x\n", 2) != 2) die("stage a file");
    close(fd);
    ensure(target, 0);
    if (mount(staged, target, NULL, MS_BIND | MS_SILENT, NULL)) die("bind a file");
    if (mount(NULL, target, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL))
      die("remount a file");
    unlink(staged);
  }
  unsigned long ro = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV;
  if (mount(NULL, "/newroot/dev", NULL, ro, NULL)) die("remount /dev");
  if (mount(NULL, "/newroot", NULL, ro, NULL)) die("remount /");
  if (mount("oldroot", "oldroot", NULL, MS_REC | MS_PRIVATE, NULL)) die("old root private");
  if (umount2("oldroot", MNT_DETACH)) die("detach the old root");
  int old = open("/", O_DIRECTORY | O_RDONLY);
  if (old < 0 || chdir("/newroot") || syscall(SYS_pivot_root, ".", ".")) die("pivot_root 2");
  if (fchdir(old) || umount2(".", MNT_DETACH) || chdir("/")) die("detach the base");
  close(old);
}

int main(int argc, char **argv) {
  if (argc < 5) {
    dprintf(2, "usage: sandbox_floor LEVEL N UID EMPTY SRC=DEST...\n");
    return 2;
  }
  int level = atoi(argv[1]), n = atoi(argv[2]), uid = atoi(argv[3]);
  const char *empty = argv[4];
  char map[64];
  snprintf(map, sizeof map, "1000 %d 1", uid);
  for (int i = 0; i < n; i++) {
    pid_t monitor = fork();
    if (monitor < 0) die("fork");
    if (monitor == 0) {
      if (level >= 1) {
        if (setgroups(0, NULL) || setresgid(uid, uid, uid) || setresuid(uid, uid, uid))
          die("switch uid");
        if (prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)) die("dumpable");
        if (unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC |
                    CLONE_NEWUTS | CLONE_NEWCGROUP))
          die("unshare");
        write_file("/proc/self/setgroups", "deny");
        write_file("/proc/self/uid_map", map);
        write_file("/proc/self/gid_map", map);
        if (sethostname("cape-sandbox", 12)) die("hostname");
      }
      if (level >= 2) {
        pid_t pid1 = fork();
        if (pid1 < 0) die("fork pid 1");
        if (pid1 == 0) {
          if (level >= 3) mount_tree(argc - 5, argv + 5, empty);
          _exit(0);
        }
        int status;
        if (waitpid(pid1, &status, 0) < 0) die("wait pid 1");
        _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 1);
      }
      _exit(0);
    }
    int status;
    if (waitpid(monitor, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status)) {
      dprintf(2, "sandbox_floor: session %d failed\n", i);
      return 1;
    }
  }
  return 0;
}
