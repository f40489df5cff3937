// A MEMORY3_* switch read from the environment. Unset or empty gives the default; a value
// outside `allowed` is an error naming the variable and its values, so a typo never runs
// the default path silently. Torch-free: std::invalid_argument reaches Python as RuntimeError.
#pragma once

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>

namespace memory3 {

inline std::string env_choice(const char* name, std::initializer_list<const char*> allowed, const char* fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  std::string values;
  for (const char* a : allowed) {
    if (std::strcmp(value, a) == 0) return value;
    values += values.empty() ? a : std::string(", ") + a;
  }
  throw std::invalid_argument(std::string(name) + "=" + value + " is not one of: " + values);
}

}  // namespace memory3
