/*
 * The stand-in ncclDebugLogger_t that tcpxshim hands to an inner plugin when NCCL gave it no
 * logger (the `tcpxshim` command). ncclDebugLogger_t is a C variadic function, which stable Rust
 * cannot define, so it lives here: it formats the line with vsnprintf and passes the text to the
 * sink Rust registered (src/logging.rs), which logs it through the `log` crate.
 *
 * Both functions are hidden: the plugin library exports ncclNetPlugin_v7 and nothing else.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "ncclnet.h"

typedef void (*tcpxshim_log_sink_t)(int level, const char *msg);

static tcpxshim_log_sink_t sink;

__attribute__((visibility("hidden"))) void tcpxshim_set_log_sink(tcpxshim_log_sink_t s) {
  __atomic_store_n(&sink, s, __ATOMIC_RELEASE);
}

__attribute__((visibility("hidden"))) void tcpxshim_fallback_logger(ncclDebugLogLevel level, unsigned long flags,
                                                                    const char *file, int line, const char *fmt,
                                                                    ...) {
  (void)flags;
  (void)file;
  (void)line;
  tcpxshim_log_sink_t s = __atomic_load_n(&sink, __ATOMIC_ACQUIRE);
  if (s == NULL || fmt == NULL) return;

  char buf[1024];
  va_list ap, again;
  va_start(ap, fmt);
  va_copy(again, ap);
  int n = vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (n < 0) {
    /* An invalid format: log it unformatted rather than lose the line. */
    va_end(again);
    s((int)level, fmt);
    return;
  }
  if ((size_t)n < sizeof buf) {
    va_end(again);
    s((int)level, buf);
    return;
  }
  /* Longer than the stack buffer: format it again into one that fits. */
  char *big = malloc((size_t)n + 1);
  if (big != NULL && vsnprintf(big, (size_t)n + 1, fmt, again) >= 0) {
    s((int)level, big);
  } else {
    s((int)level, buf); /* out of memory: the truncated line is better than none */
  }
  va_end(again);
  free(big);
}

/* The compiler checks that the definition has exactly NCCL's logger type. */
static const ncclDebugLogger_t tcpxshim_fallback_logger_has_nccl_type __attribute__((unused)) =
    tcpxshim_fallback_logger;
