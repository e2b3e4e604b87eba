/* CMSDK APB UART 0 of Arm's MPS2 AN385 / AN386 boards, as QEMU's hw/char/cmsdk-apb-uart.c
 * models it: one byte of buffer each way, no FIFO, 8N1 only.
 *
 * Registers (base 0x40004000): DATA +0x0; STATE +0x4 (bit 0 TX buffer full, bit 1 RX buffer
 * full); CTRL +0x8 (bit 0 TX enable, bit 1 RX enable, bit 3 RX interrupt enable); INTSTATUS
 * +0xC (write 1 to clear); BAUDDIV +0x10 (QEMU ignores a divider below 16 and complains about
 * enabling TX without a valid one). The UART's RX interrupt is NVIC line 0.
 *
 * Receiving sleeps in WFI until a byte arrives: the RX interrupt is enabled in the UART and
 * the NVIC but PRIMASK stays set, so the interrupt wakes the core without being taken (the
 * harness's vector table has no entries for external interrupts). An idle board under QEMU
 * then costs no host CPU. */
#ifndef EDGEOPS_UART_H
#define EDGEOPS_UART_H

#include <stdint.h>

#define EO_UART0_BASE 0x40004000u
#define EO_UART_DATA (*(volatile uint32_t *)(EO_UART0_BASE + 0x00u))
#define EO_UART_STATE (*(volatile uint32_t *)(EO_UART0_BASE + 0x04u))
#define EO_UART_CTRL (*(volatile uint32_t *)(EO_UART0_BASE + 0x08u))
#define EO_UART_INTSTATUS (*(volatile uint32_t *)(EO_UART0_BASE + 0x0Cu))
#define EO_UART_BAUDDIV (*(volatile uint32_t *)(EO_UART0_BASE + 0x10u))

#define EO_UART_STATE_TX_FULL 0x1u
#define EO_UART_STATE_RX_FULL 0x2u
#define EO_UART_CTRL_TX_EN 0x1u
#define EO_UART_CTRL_RX_EN 0x2u
#define EO_UART_CTRL_RX_INTEN 0x8u
#define EO_UART_INT_RX 0x2u

#define EO_NVIC_ISER0 (*(volatile uint32_t *)0xE000E100u)
#define EO_NVIC_ICPR0 (*(volatile uint32_t *)0xE000E280u)
#define EO_UART0_RX_IRQ 0u

#define EO_SYSTEM_CLOCK_HZ 25000000u
#define EO_UART_BAUD 115200u

static inline void eo_uart_init(void) {
    __asm__ volatile("cpsid i" : : : "memory");
    EO_UART_CTRL = 0u;
    EO_UART_BAUDDIV = EO_SYSTEM_CLOCK_HZ / EO_UART_BAUD;
    EO_UART_INTSTATUS = 0xFu;
    EO_NVIC_ICPR0 = 1u << EO_UART0_RX_IRQ;
    EO_NVIC_ISER0 = 1u << EO_UART0_RX_IRQ;
    EO_UART_CTRL = EO_UART_CTRL_TX_EN | EO_UART_CTRL_RX_EN | EO_UART_CTRL_RX_INTEN;
}

static inline void eo_uart_put(uint8_t byte) {
    while ((EO_UART_STATE & EO_UART_STATE_TX_FULL) != 0u) {
    }
    EO_UART_DATA = byte;
}

static inline int eo_uart_ready(void) {
    return (EO_UART_STATE & EO_UART_STATE_RX_FULL) != 0u;
}

static inline uint8_t eo_uart_take(void) {
    return (uint8_t)(EO_UART_DATA & 0xFFu);
}

/* Sleeps until a byte has arrived (or another enabled interrupt is pending), then returns. The
 * interrupt flags are cleared before the buffer is checked again, so a byte arriving between
 * the check and the WFI leaves the interrupt pending and the WFI returns at once. */
static inline void eo_uart_sleep(void) {
    if (eo_uart_ready()) {
        return;
    }
    EO_UART_INTSTATUS = EO_UART_INT_RX;
    EO_NVIC_ICPR0 = 1u << EO_UART0_RX_IRQ;
    if (eo_uart_ready()) {
        return;
    }
    __asm__ volatile("dsb\n\twfi" : : : "memory");
}

#endif /* EDGEOPS_UART_H */
