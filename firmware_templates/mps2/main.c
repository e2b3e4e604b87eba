/* EdgeOps bare-metal harness for QEMU's mps2-an385 / mps2-an386.
 *
 * Reads int8 input tensors (EDGEOPS_MODEL_INPUT_SIZE values each, back to back; float32
 * where the model's input is float32) from the host file edgeops_inputs.bin through
 * semihosting, runs the model on each, and writes the output tensors (int8, or float32) to
 * edgeops_outputs.bin and, per sample, the ticks of the 25 MHz CMSDK APB timer 0 that the
 * inference (with the float conversions, if any) took (uint32, little-endian) to
 * edgeops_ticks.bin. Under
 * `qemu-system-arm -icount shift=0` one guest instruction advances the virtual clock by
 * 1 ns, so one tick is 40 instructions. Exit status 0 on success. */
#include <stdint.h>

#include "edgeops_model.h"
#include "semihosting.h"

/* CMSDK APB timer 0: a 32-bit down-counter clocked at the 25 MHz system clock. */
#define EO_TIMER0_BASE 0x40000000u
#define EO_TIMER_CTRL (*(volatile uint32_t *)(EO_TIMER0_BASE + 0x00u))
#define EO_TIMER_VALUE (*(volatile uint32_t *)(EO_TIMER0_BASE + 0x04u))
#define EO_TIMER_RELOAD (*(volatile uint32_t *)(EO_TIMER0_BASE + 0x08u))

static void eo_timer_start(void) {
    EO_TIMER_CTRL = 0u;
    EO_TIMER_RELOAD = 0xffffffffu;
    EO_TIMER_VALUE = 0xffffffffu;
    EO_TIMER_CTRL = 1u;
}

static void eo_print_number(const char *label, uint32_t value) {
    char text[48];
    char digits[11];
    uint32_t n = 0;
    uint32_t i = 0;
    do {
        digits[n++] = (char)('0' + (char)(value % 10u));
        value /= 10u;
    } while (value != 0u);
    while (label[i] != '\0' && i < 32u) {
        text[i] = label[i];
        ++i;
    }
    while (n > 0u) {
        text[i++] = digits[--n];
    }
    text[i++] = '\n';
    text[i] = '\0';
    eo_print(text);
}

int main(void) {
#ifdef EDGEOPS_MODEL_FLOAT_INPUT
    static float input[EDGEOPS_MODEL_INPUT_SIZE];
    static int8_t input_q[EDGEOPS_MODEL_INPUT_SIZE];
#else
    static int8_t input[EDGEOPS_MODEL_INPUT_SIZE];
    int8_t *const input_q = input;
#endif
#ifdef EDGEOPS_MODEL_FLOAT_OUTPUT
    static float output[EDGEOPS_MODEL_OUTPUT_SIZE];
    static int8_t output_q[EDGEOPS_MODEL_OUTPUT_SIZE];
#else
    static int8_t output[EDGEOPS_MODEL_OUTPUT_SIZE];
    int8_t *const output_q = output;
#endif
    uint32_t samples = 0;
    uint32_t total_ticks = 0;
    int32_t inputs = eo_open("edgeops_inputs.bin", EO_OPEN_READ_BINARY);
    int32_t outputs = eo_open("edgeops_outputs.bin", EO_OPEN_WRITE_BINARY);
    int32_t ticks = eo_open("edgeops_ticks.bin", EO_OPEN_WRITE_BINARY);
    if (inputs < 0 || outputs < 0 || ticks < 0) {
        eo_print("edgeops: cannot open edgeops_inputs.bin or the output files\n");
        return 1;
    }
    edgeops_model_init();
    eo_timer_start();
    while (eo_read(inputs, input, sizeof input) == sizeof input) {
        uint32_t before = EO_TIMER_VALUE;
        uint32_t after;
        int status;
#ifdef EDGEOPS_MODEL_FLOAT_INPUT
        edgeops_model_quantize_input(input, input_q);
#endif
        status = edgeops_model_invoke(input_q, output_q);
#ifdef EDGEOPS_MODEL_FLOAT_OUTPUT
        edgeops_model_dequantize_output(output_q, output);
#endif
        after = EO_TIMER_VALUE;
        if (status != 0) {
            eo_print("edgeops: invoke failed\n");
            return 2;
        }
        if (eo_write(outputs, output, sizeof output) != 0) {
            eo_print("edgeops: cannot write edgeops_outputs.bin\n");
            return 3;
        }
        before -= after;
        if (eo_write(ticks, &before, sizeof before) != 0) {
            eo_print("edgeops: cannot write edgeops_ticks.bin\n");
            return 3;
        }
        total_ticks += before;
        ++samples;
    }
    eo_close(inputs);
    eo_close(outputs);
    eo_close(ticks);
    eo_print_number("edgeops: samples ", samples);
    eo_print_number("edgeops: timer ticks ", total_ticks);
    return 0;
}
