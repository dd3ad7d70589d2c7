#pragma once
#include "softcuda.h"
