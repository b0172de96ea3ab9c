// Test-only: the op that chooses the emulator's schedule (cuda_emulation.h), registered by each
// emulation build as `set_schedule(str schedule) -> ()` with "concurrent", "forward" or "reverse".
#pragma once

#include <string>

#include <c10/util/Exception.h>

#include "emulation/cuda_emulation.h"

namespace avme {
namespace emu {

inline void set_schedule_op(const std::string& schedule) {
  if (schedule == "concurrent") {
    set_schedule(Schedule::kConcurrent);
  } else if (schedule == "forward") {
    set_schedule(Schedule::kForward);
  } else if (schedule == "reverse") {
    set_schedule(Schedule::kReverse);
  } else {
    TORCH_CHECK_VALUE(false, "set_schedule: schedule must be 'concurrent', 'forward' or 'reverse', got '",
                      schedule, "'");
  }
}

inline std::string schedule_name() {
  switch (current_schedule()) {
    case Schedule::kForward:
      return "forward";
    case Schedule::kReverse:
      return "reverse";
    default:
      return "concurrent";
  }
}

}  // namespace emu
}  // namespace avme
