/* host is a C program that loads the Go c-shared library ../lib.go at run time (dlopen) and
 * calls its exported functions when told, one command a line on stdin:
 *
 *   host LIBRARY     prints "ready" once LIBRARY is loaded (its Go runtime started)
 *   loop C D         DeferLoop(C, D)
 *   hold N           Hold(N)
 *   release          Release()
 *
 * and exits 0 at the end of stdin. The library prints its own ground truth on stdout. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: host LIBRARY\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    void *library = dlopen(argv[1], RTLD_NOW);
    if (library == NULL) {
        fprintf(stderr, "host: %s\n", dlerror());
        return 1;
    }
    void (*defer_loop)(int, int) = (void (*)(int, int))dlsym(library, "DeferLoop");
    void (*hold)(int) = (void (*)(int))dlsym(library, "Hold");
    void (*release)(void) = (void (*)(void))dlsym(library, "Release");
    if (defer_loop == NULL || hold == NULL || release == NULL) {
        fprintf(stderr, "host: %s lacks DeferLoop, Hold or Release\n", argv[1]);
        return 1;
    }
    printf("ready\n");
    char line[128];
    while (fgets(line, sizeof line, stdin) != NULL) {
        int a, b;
        if (sscanf(line, "loop %d %d", &a, &b) == 2) {
            defer_loop(a, b);
        } else if (sscanf(line, "hold %d", &a) == 1) {
            hold(a);
        } else if (strcmp(line, "release\n") == 0) {
            release();
        } else {
            fprintf(stderr, "host: unknown command %s", line);
            return 2;
        }
    }
    return 0;
}
