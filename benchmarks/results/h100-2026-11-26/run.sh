# Device checks for issue #5 (session 5). bash .gpu/run2.sh  (OUT set by the device tool)
[ "${DEV:-cuda}" = cpu ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
D=${DEV:-cuda}; S=${S:-1}
n() { python3 -c "print(max(1, int($1 * $S)))"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version()); print(open('/proc/cpuinfo').read().count('processor'), 'cpus')" | tee -a $OUT/gpu.txt
git log -1 --format='commit %H' 2>/dev/null | tee -a $OUT/gpu.txt
B="python3 benchmarks/speed.py .gpu/coco-val --device $D --no-peer"
echo "== 1 check"; timeout 60 python3 .gpu/check.py $D 2>&1 | tee $OUT/check.log
echo "== 2 default"; timeout 110 $B --limit $(n 60) --agree $(n 20) --e2e $(n 960) 2>&1 | tee $OUT/speed_default.log
echo "== 3 variants"; timeout 60 $B --limit $(n 60) --variant precision=bf16 --variant precision=fp32 2>&1 | tee $OUT/speed_variants.log
echo "== 4 recall"; timeout 50 python3 benchmarks/recall.py .gpu/coco-val --device $D --no-peer 2>&1 | tee $OUT/recall.log
echo "== 5 e2e b16"; timeout 35 $B --limit 0 --e2e $(n 960) --batch-size 16 --workers 14 2>&1 | tee $OUT/e2e_b16_w14.log
echo "== 6 e2e b8 w14"; timeout 35 $B --limit 0 --e2e $(n 960) --batch-size 8 --workers 14 2>&1 | tee $OUT/e2e_b8_w14.log
echo "== 7 profile"; SKIP=1 timeout 40 python3 .gpu/gpuprof.py $D 2>&1 | grep -v "^USDT\|^ERROR:.*Device" | tee $OUT/profile.log
echo done
