/* Start-up code of the EdgeOps bare-metal harness for Arm's MPS2 boards (AN385: Cortex-M3,
 * AN386: Cortex-M4), as QEMU models them. The vector table sits at address 0; the reset
 * handler copies .data from flash to RAM, clears .bss and calls main. A fault ends the
 * program through semihosting with status 70 + the exception number, so a crash under QEMU
 * never hangs. */
#include <stdint.h>

#include "semihosting.h"

extern uint32_t __data_load[];
extern uint32_t __data_start[];
extern uint32_t __data_end[];
extern uint32_t __bss_start[];
extern uint32_t __bss_end[];
extern uint32_t __stack_top[];

int main(void);
void eo_reset_handler(void);
void eo_fault_handler(void);

void eo_reset_handler(void) {
    uint32_t *source = __data_load;
    uint32_t *target = __data_start;
    while (target < __data_end) {
        *target++ = *source++;
    }
    for (target = __bss_start; target < __bss_end; ++target) {
        *target = 0u;
    }
    eo_exit((uint32_t)main());
}

void eo_fault_handler(void) {
    uint32_t ipsr;
    __asm__ volatile("mrs %0, ipsr" : "=r"(ipsr));
    eo_print("edgeops: fault\n");
    eo_exit(70u + (ipsr & 0x1ffu));
}

typedef void (*eo_vector)(void);

/* Initial stack pointer, then reset, NMI, hard fault, memory management, bus and usage
 * faults; the rest are unused by the harness and also end the program. */
__attribute__((section(".isr_vector"), used)) static const eo_vector eo_vectors[16] = {
    (eo_vector)(uintptr_t)__stack_top,
    eo_reset_handler,
    eo_fault_handler,
    eo_fault_handler,
    eo_fault_handler,
    eo_fault_handler,
    eo_fault_handler,
    0,
    0,
    0,
    0,
    eo_fault_handler,
    eo_fault_handler,
    0,
    eo_fault_handler,
    eo_fault_handler,
};
