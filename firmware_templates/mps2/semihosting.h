/* Arm semihosting for the EdgeOps bare-metal harness: the debugger (here QEMU with
 * -semihosting-config enable=on,target=native) opens, reads and writes host files and ends
 * the program. Each call is a BKPT 0xAB with the operation in r0 and a parameter block in r1. */
#ifndef EDGEOPS_SEMIHOSTING_H
#define EDGEOPS_SEMIHOSTING_H

#include <stdint.h>

#define EO_SYS_OPEN 0x01
#define EO_SYS_CLOSE 0x02
#define EO_SYS_WRITE0 0x04
#define EO_SYS_WRITE 0x05
#define EO_SYS_READ 0x06
#define EO_SYS_EXIT_EXTENDED 0x20
#define EO_ADP_STOPPED_APPLICATION_EXIT 0x20026u

#define EO_OPEN_READ_BINARY 1u
#define EO_OPEN_WRITE_BINARY 5u

static inline int32_t eo_semihost(int32_t operation, const void *block) {
    register int32_t r0 __asm__("r0") = operation;
    register const void *r1 __asm__("r1") = block;
    __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}

static inline uint32_t eo_address(const void *pointer) {
    return (uint32_t)(uintptr_t)pointer;
}

static inline uint32_t eo_strlen(const char *text) {
    uint32_t n = 0;
    while (text[n] != '\0') {
        ++n;
    }
    return n;
}

/* A host file handle, or -1. */
static inline int32_t eo_open(const char *name, uint32_t mode) {
    uint32_t block[3];
    block[0] = eo_address(name);
    block[1] = mode;
    block[2] = eo_strlen(name);
    return eo_semihost(EO_SYS_OPEN, block);
}

static inline void eo_close(int32_t handle) {
    uint32_t block[1];
    block[0] = (uint32_t)handle;
    (void)eo_semihost(EO_SYS_CLOSE, block);
}

/* The number of bytes read (fewer than size at the end of the file). */
static inline uint32_t eo_read(int32_t handle, void *buffer, uint32_t size) {
    uint32_t block[3];
    int32_t left;
    block[0] = (uint32_t)handle;
    block[1] = eo_address(buffer);
    block[2] = size;
    left = eo_semihost(EO_SYS_READ, block);
    if (left < 0 || (uint32_t)left > size) {
        return 0;
    }
    return size - (uint32_t)left;
}

/* 0 when every byte was written. */
static inline int32_t eo_write(int32_t handle, const void *buffer, uint32_t size) {
    uint32_t block[3];
    block[0] = (uint32_t)handle;
    block[1] = eo_address(buffer);
    block[2] = size;
    return eo_semihost(EO_SYS_WRITE, block);
}

/* Writes a NUL-terminated string to the debugger's console (QEMU prints it on stderr). */
static inline void eo_print(const char *text) {
    (void)eo_semihost(EO_SYS_WRITE0, text);
}

/* Ends the program; QEMU exits with this status. */
static inline void eo_exit(uint32_t status) {
    uint32_t block[2];
    block[0] = EO_ADP_STOPPED_APPLICATION_EXIT;
    block[1] = status;
    for (;;) {
        (void)eo_semihost(EO_SYS_EXIT_EXTENDED, block);
    }
}

#endif /* EDGEOPS_SEMIHOSTING_H */
