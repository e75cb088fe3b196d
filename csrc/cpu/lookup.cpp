// Native CPU nearest-code lookup (placeholder until the blocked kernel lands).
#include <torch/extension.h>
