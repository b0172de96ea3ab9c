// Test-only: the ops that choose and name the emulator's schedule (cuda_emulation.h), registered
// by avme_emulation.cpp as `set_schedule(str schedule) -> ()` ("concurrent", "forward" or
// "reverse") and `schedule() -> str`.
#pragma once

#include <iterator>
#include <string>

#include <c10/util/Exception.h>

#include "emulation/cuda_emulation.h"

namespace avme {
namespace emu {

// The schedules' names, in the order of Schedule's values.
inline constexpr const char* kScheduleNames[] = {"concurrent", "forward", "reverse"};

inline void set_schedule_op(const std::string& schedule) {
  for (size_t i = 0; i < std::size(kScheduleNames); ++i) {
    if (schedule == kScheduleNames[i]) {
      set_schedule(static_cast<Schedule>(i));
      return;
    }
  }
  TORCH_CHECK_VALUE(false, "set_schedule: schedule must be 'concurrent', 'forward' or 'reverse', got '",
                    schedule, "'");
}

inline std::string schedule_name() { return kScheduleNames[static_cast<int>(current_schedule())]; }

}  // namespace emu
}  // namespace avme
