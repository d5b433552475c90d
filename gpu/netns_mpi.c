/* Preloaded into each nccl-tests rank by the GPU suite (nccltests.py run --netns): after MPI_Init
 * has connected the rank to mpirun (PMIx, over the machine's loopback), the rank's main thread
 * moves into its own network namespace, /run/netns/<name> with <name> the rank's entry of
 * TCPXSHIM_NETNS (comma separated, by OMPI_COMM_WORLD_RANK). Sockets keep the namespace they were
 * made in, so MPI's connection to mpirun keeps working, while every socket NCCL and the plugin
 * make afterwards (and every thread NCCL starts) is in the rank's namespace.
 *
 *   cc -shared -fPIC -o netns_mpi.so gpu/netns_mpi.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int PMPI_Init(int *argc, char ***argv);
int PMPI_Init_thread(int *argc, char ***argv, int required, int *provided);

static void enter_netns(void) {
  const char *list = getenv("TCPXSHIM_NETNS");
  const char *r = getenv("OMPI_COMM_WORLD_RANK");
  if (!list || !*list || !r) return;
  int rank = atoi(r), n = 1;
  for (const char *p = list; *p; p++) n += *p == ',';
  int want = rank % n, i = 0;
  const char *start = list;
  for (const char *p = list;; p++) {
    if (*p == ',' || !*p) {
      if (i == want) {
        char path[256];
        snprintf(path, sizeof path, "/run/netns/%.*s", (int)(p - start), start);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0 || setns(fd, CLONE_NEWNET) != 0) {
          perror(path);
          fprintf(stderr, "netns_mpi: rank %d cannot enter network namespace %s\n", rank, path);
          exit(3);
        }
        close(fd);
        return;
      }
      if (!*p) return;
      i++;
      start = p + 1;
    }
  }
}

int MPI_Init(int *argc, char ***argv) {
  int rc = PMPI_Init(argc, argv);
  enter_netns();
  return rc;
}

int MPI_Init_thread(int *argc, char ***argv, int required, int *provided) {
  int rc = PMPI_Init_thread(argc, argv, required, provided);
  enter_netns();
  return rc;
}
