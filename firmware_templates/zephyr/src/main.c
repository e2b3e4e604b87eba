/* Zephyr application: runs the EdgeOps model once on an input of zero points and prints
 * the outputs and the cycles the invoke took. Replace the input with your sensor data. */
#include <stdint.h>

#include <zephyr/kernel.h>
#include <zephyr/sys/printk.h>

#include "edgeops_model.h"

static int8_t input[EDGEOPS_MODEL_INPUT_SIZE];
static int8_t output[EDGEOPS_MODEL_OUTPUT_SIZE];

int main(void) {
    uint32_t i;
    uint32_t start;
    uint32_t cycles;
    for (i = 0; i < EDGEOPS_MODEL_INPUT_SIZE; ++i) {
        input[i] = (int8_t)EDGEOPS_MODEL_INPUT_ZERO_POINT;
    }
    edgeops_model_init();
    start = k_cycle_get_32();
    if (edgeops_model_invoke(input, output) != 0) {
        printk("edgeops: invoke failed\n");
        return 1;
    }
    cycles = k_cycle_get_32() - start;
    printk("edgeops: invoke took %u cycles\n", (unsigned int)cycles);
    for (i = 0; i < EDGEOPS_MODEL_OUTPUT_SIZE; ++i) {
        printk("edgeops: output[%u] = %d\n", (unsigned int)i, (int)output[i]);
    }
    return 0;
}
