/* ESP-IDF example: runs the EdgeOps model once on an input of zero points and logs the
 * outputs and the microseconds the invoke took. Replace the input with your sensor data. */
#include <inttypes.h>
#include <stdint.h>

#include "esp_log.h"
#include "esp_timer.h"

#include "edgeops_model.h"

static const char *TAG = "edgeops";
static int8_t input[EDGEOPS_MODEL_INPUT_SIZE];
static int8_t output[EDGEOPS_MODEL_OUTPUT_SIZE];

void app_main(void) {
    uint32_t i;
    int64_t start;
    int64_t took;
    for (i = 0; i < EDGEOPS_MODEL_INPUT_SIZE; ++i) {
        input[i] = (int8_t)EDGEOPS_MODEL_INPUT_ZERO_POINT;
    }
    edgeops_model_init();
    start = esp_timer_get_time();
    if (edgeops_model_invoke(input, output) != 0) {
        ESP_LOGE(TAG, "invoke failed");
        return;
    }
    took = esp_timer_get_time() - start;
    ESP_LOGI(TAG, "invoke took %" PRId64 " us", took);
    for (i = 0; i < EDGEOPS_MODEL_OUTPUT_SIZE; ++i) {
        ESP_LOGI(TAG, "output[%" PRIu32 "] = %d", i, (int)output[i]);
    }
}
