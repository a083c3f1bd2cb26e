// The per-latent statistics tables (gradsae.LatentStats), in the one order the kernels, the
// binding and the Python side take them. gradsae/stats.py FIELDS names the same tables in
// the same order: the binding exports this list as _C.STATS_FIELDS, the cuda backend refuses a
// module whose list differs, and a test compares this file with stats.py without building.
#pragma once

// X(name, C type of one entry)
#define GRADSAE_STATS_FIELDS(X) \
  X(count, long long)           \
  X(act_sum, double)            \
  X(score_sum, double)          \
  X(relu_sum, double)           \
  X(abs_sum, double)            \
  X(score_max, double)

namespace gradsae {

// Device pointers to the tables, [d_sae] each; all null = no statistics.
struct StatsTables {
#define GRADSAE_STATS_MEMBER(name, type) type* name;
  GRADSAE_STATS_FIELDS(GRADSAE_STATS_MEMBER)
#undef GRADSAE_STATS_MEMBER
};

enum StatsField : int {
#define GRADSAE_STATS_INDEX(name, type) kStats_##name,
  GRADSAE_STATS_FIELDS(GRADSAE_STATS_INDEX)
#undef GRADSAE_STATS_INDEX
  kNumStatsFields
};

}  // namespace gradsae
