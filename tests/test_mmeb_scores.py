"""MMEB scoring (P@1, tie rules, averages that refuse incomplete sets) and the report files."""
import json
import os

import numpy as np
import pytest

from coma_jax.eval.mmeb_report import write_report
from coma_jax.eval.mmeb_scores import aggregate, load_task_table, mean_cosine, normalize_name, score_dataset

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
E1, E2 = [1.0, 0.0], [0.0, 1.0]

# Four queries, candidate lists of 3, 2, 1 and 3 rows (row 0 the positive):
# q0 positive ties the best other (1 vs 1); q1 positive loses (0 vs 1); q2 positive alone;
# q3 positive ties a candidate (0.6) but another beats both (0.8): not a tie with the best other.
QUERIES = np.array([E1, E2, E1, E1])
CANDIDATES = [np.array([E1, E1, E2]), np.array([E1, E2]), np.array([E2]),
              np.array([[0.6, 0.8], [0.6, 0.8], [0.8, 0.6]])]


def test_tie_rules_on_a_constructed_tie():
  reference = score_dataset(QUERIES, CANDIDATES, tie_rule='reference')
  strict = score_dataset(QUERIES, CANDIDATES, tie_rule='strict')
  # hits: reference q0 (tie) + q2; strict q2 only.
  assert (reference['hits'], reference['p_at_1']) == (2, 0.5)
  assert (strict['hits'], strict['p_at_1']) == (1, 0.25)
  assert reference['ties'] == strict['ties'] == 1
  assert reference['queries'] == strict['queries'] == 4
  assert reference['chance'] == pytest.approx((1 / 3 + 1 / 2 + 1 + 1 / 3) / 4)
  assert (reference['tie_rule'], strict['tie_rule']) == ('reference', 'strict')


def test_default_rule_is_the_reference_one():
  assert score_dataset(QUERIES, CANDIDATES) == score_dataset(QUERIES, CANDIDATES, tie_rule='reference')


def test_ties_are_counted_per_query():
  # q0: tie at the top; q1: positive wins; q2: positive, two others all equal (one tie); q3: tie below the best.
  queries = np.array([E1, E1, E2, E2])
  candidates = [np.array([E1, E1]), np.array([E1, E2, E2]), np.array([E2, E2, E2]),
                np.array([E1, E1, E2])]
  reference = score_dataset(queries, candidates, 'reference')
  strict = score_dataset(queries, candidates, 'strict')
  assert reference['ties'] == strict['ties'] == 2
  assert reference['hits'] == 3 and strict['hits'] == 1


def test_candidate_lists_of_different_lengths():
  rng = np.random.default_rng(0)
  queries = rng.normal(size=(5, 4))
  candidates = [rng.normal(size=(n, 4)) for n in (1, 2, 7, 3, 10)]
  expected_hits = sum(int(np.argmax(c @ q) == 0) for q, c in zip(queries, candidates))
  result = score_dataset(queries, candidates)
  assert result['hits'] == expected_hits and result['ties'] == 0
  assert result['p_at_1'] == expected_hits / 5
  assert result['chance'] == pytest.approx((1 + 1 / 2 + 1 / 7 + 1 / 3 + 1 / 10) / 5)


@pytest.mark.parametrize('queries, candidates, tie_rule, message', [
    (QUERIES, CANDIDATES, 'lenient', 'tie_rule'),
    (np.ones(2), [np.ones((1, 2))], 'reference', 'query_emb must be 2-D'),
    (np.ones((0, 2)), [], 'reference', 'no queries'),
    (QUERIES, CANDIDATES[:3], 'reference', '3 candidate lists for 4 queries'),
    (np.ones((1, 2)), [np.ones((2, 3))], 'reference', r'candidate_embs\[0\] must be \(C, 2\)'),
    (np.ones((1, 2)), [np.ones((0, 2))], 'reference', 'C >= 1'),
    (np.ones((1, 2)), [np.ones(2)], 'reference', r'candidate_embs\[0\] must be 2-D'),
    (np.array([[np.nan, 1.0]]), [np.ones((1, 2))], 'reference', 'non-finite'),
])
def test_bad_inputs_are_refused_clearly(queries, candidates, tie_rule, message):
  with pytest.raises(ValueError, match=message):
    score_dataset(queries, candidates, tie_rule)


# The MMEB v1 table read independently of the code under test.
with open(os.path.join(os.path.dirname(__file__), '..', 'coma_jax', 'data', 'mmeb_v1_datasets.json')) as f:
  MMEB = json.load(f)['datasets']
FULL = {name: (i + 1) / 100 for i, name in enumerate(MMEB)}  # 0.01 .. 0.36 in the table's order


def _mean(values):
  values = list(values)
  return sum(values) / len(values)


def test_full_set_averages():
  result = aggregate(FULL)
  # By hand, in percent: the table lists classification 1-10, vqa 11-20, retrieval 21-32, grounding 33-36;
  # IND = 1-5, 11-16, 21-28, 33 (sum 325 over 20); OOD = the rest (sum 341 over 16).
  hand = {'classification': 0.055, 'vqa': 0.155, 'retrieval': 0.265, 'grounding': 0.345}
  assert {task: group['mean'] for task, group in result['meta_tasks'].items()} == pytest.approx(hand)
  assert result['IND']['mean'] == pytest.approx(0.1625)
  assert result['OOD']['mean'] == pytest.approx(0.213125)
  assert result['overall']['mean'] == pytest.approx(0.185)
  # The same by a simple loop over the table.
  for task in hand:
    assert result['meta_tasks'][task]['mean'] == pytest.approx(
        _mean(p for name, p in FULL.items() if MMEB[name]['meta_task'] == task))
  for split in ('IND', 'OOD'):
    members = [name for name in MMEB if MMEB[name]['split'] == split]
    assert len(members) == {'IND': 20, 'OOD': 16}[split]
    assert result[split]['datasets'] == members and result[split]['missing'] == []
    assert result[split]['mean'] == pytest.approx(_mean(FULL[name] for name in members))
  assert len(result['overall']['datasets']) == 36
  assert result['datasets']['OK-VQA'] == {'p_at_1': 0.11, 'benchmark': 'MMEB-V1', 'meta_task': 'vqa',
                                          'split': 'IND', 'chance': None}
  assert result['custom'] == {'mean': None, 'datasets': [], 'missing': [], 'meta_tasks': {}}


def test_overall_is_the_mean_of_datasets_not_of_meta_tasks():
  result = aggregate(FULL)
  assert result['overall']['mean'] != pytest.approx(_mean(g['mean'] for g in result['meta_tasks'].values()))


def test_missing_datasets_void_their_averages_and_are_listed():
  partial = {name: p for name, p in FULL.items() if name not in ('OK-VQA', 'RefCOCO')}
  result = aggregate(partial)
  tasks = result['meta_tasks']
  assert tasks['vqa']['mean'] is None and tasks['vqa']['missing'] == ['OK-VQA']
  assert tasks['grounding']['mean'] is None and tasks['grounding']['missing'] == ['RefCOCO']
  assert tasks['classification']['mean'] == pytest.approx(0.055) and tasks['classification']['missing'] == []
  assert tasks['retrieval']['mean'] == pytest.approx(0.265)
  assert (result['IND']['mean'], result['IND']['missing']) == (None, ['OK-VQA'])
  assert (result['OOD']['mean'], result['OOD']['missing']) == (None, ['RefCOCO'])
  assert (result['overall']['mean'], result['overall']['missing']) == (None, ['OK-VQA', 'RefCOCO'])
  assert 'OK-VQA' not in result['datasets'] and len(result['datasets']) == 34


def test_names_match_across_spellings():
  assert normalize_name('OK-VQA') == normalize_name('OK_VQA') == normalize_name('ok vqa') == 'okvqa'
  respelled = {name.replace('-', '_').lower() if i % 2 else name.replace('_', '-'): p
               for i, (name, p) in enumerate(FULL.items())}
  assert set(respelled) != set(FULL)
  result = aggregate(respelled)
  assert list(result['datasets']) == list(MMEB)  # reported under the benchmark's spelling
  assert result['overall']['mean'] == pytest.approx(0.185)
  assert result['custom']['datasets'] == []
  with pytest.raises(ValueError, match='name the same dataset'):
    aggregate({'OK-VQA': 0.1, 'OK_VQA': 0.2})


def test_scores_can_be_score_dataset_results_and_are_checked():
  assert aggregate({'OK-VQA': {'p_at_1': 0.25, 'ties': 0}})['datasets']['OK-VQA']['p_at_1'] == 0.25
  for bad in (float('nan'), 1.5, None, True):
    with pytest.raises(ValueError, match='P@1 must be'):
      aggregate({'OK-VQA': bad})


TASK_TABLE = {
    'MyCaps': {'meta_task': 'captioning', 'chance': 0.01},
    'My-VQA': {'meta_task': 'vqa2', 'chance': 0.25},
    'Extra': {'meta_task': 'captioning'},
    'ImageNet_1K': {'meta_task': 'classification', 'chance': 0.001},
}


def test_task_table_custom_datasets_and_chance(tmp_path):
  path = tmp_path / 'tasks.json'
  path.write_text(json.dumps(TASK_TABLE))
  table = load_task_table(str(path))
  scores = {**FULL, 'MyCaps': 0.5, 'my_vqa': 0.3, 'Extra': 0.7, 'Loose': 0.2}
  result = aggregate(scores, table)
  custom = result['custom']
  assert custom['datasets'] == ['MyCaps', 'My-VQA', 'Extra', 'Loose'] and custom['missing'] == []
  assert custom['mean'] == pytest.approx((0.5 + 0.3 + 0.7 + 0.2) / 4)
  assert custom['meta_tasks']['captioning']['mean'] == pytest.approx(0.6)
  assert custom['meta_tasks']['vqa2']['mean'] == pytest.approx(0.3)
  assert set(custom['meta_tasks']) == {'captioning', 'vqa2'}
  assert result['datasets']['MyCaps'] == {'p_at_1': 0.5, 'benchmark': 'custom', 'meta_task': 'captioning',
                                          'split': None, 'chance': 0.01}
  assert result['datasets']['My-VQA']['chance'] == 0.25
  assert result['datasets']['Extra']['chance'] is None
  assert result['datasets']['Loose']['meta_task'] is None
  assert result['datasets']['ImageNet-1K']['chance'] == 0.001
  assert result['overall']['mean'] == pytest.approx(0.185)  # custom datasets stay out of MMEB averages
  # A task-table dataset without a score voids its meta-task and the custom mean.
  del scores['Extra']
  result = aggregate(scores, table)
  assert result['custom']['meta_tasks']['captioning'] == {'mean': None, 'datasets': ['MyCaps', 'Extra'],
                                                          'missing': ['Extra']}
  assert (result['custom']['mean'], result['custom']['missing']) == (None, ['Extra'])
  assert result['custom']['meta_tasks']['vqa2']['mean'] == pytest.approx(0.3)


def test_custom_datasets_without_a_task_table():
  result = aggregate({'Loose': 0.2, 'Other': 0.4})
  assert result['custom']['mean'] == pytest.approx(0.3) and result['custom']['meta_tasks'] == {}
  assert result['overall']['mean'] is None and len(result['overall']['missing']) == 36


@pytest.mark.parametrize('table, message', [
    ({'X': {'chance': 0.1}}, 'meta_task'),
    ({'X': {'meta_task': 'a', 'chance': 2}}, r'chance must be a number in \[0, 1\]'),
    ({'X': {'meta_task': 'a'}, 'x': {'meta_task': 'a'}}, 'name the same dataset'),
    ({'OK_VQA': {'meta_task': 'retrieval'}}, "MMEB v1 'vqa'"),
    ([1, 2], 'JSON object'),
])
def test_bad_task_tables_are_refused(table, message):
  with pytest.raises(ValueError, match=message):
    aggregate({}, table)


def _score(p, queries=1000, ties=0):
  return {'p_at_1': p, 'queries': queries, 'hits': round(p * queries), 'ties': ties, 'chance': 0.001,
          'tie_rule': 'reference'}


def test_write_report(tmp_path):
  scores = {name: _score(p, ties=i % 3) for i, (name, p) in enumerate(FULL.items()) if name != 'RefCOCO'}
  scores['OK_VQA'] = scores.pop('OK-VQA')  # the report joins across spellings too
  scores['MyCaps'] = _score(0.5)
  table = {'MyCaps': {'meta_task': 'captioning', 'chance': 0.02}}
  result = aggregate(scores, table)
  meta = {'model': 'runs/stage2/checkpoint_1000', 'tie_rule': 'reference'}
  paths = write_report(str(tmp_path / 'report'), scores, result, meta)
  assert [os.path.basename(p) for p in paths] == ['report.json', 'report.md', 'report.png']

  with open(paths[0]) as f:
    report = json.load(f)
  assert report['meta'] == meta
  assert report['datasets']['OK-VQA']['ties'] == scores['OK_VQA']['ties']
  assert report['datasets']['MyCaps']['chance'] == 0.02  # the task table's chance
  assert report['datasets']['ImageNet-1K']['chance'] == 0.001  # the random ranking's
  assert report['aggregate']['overall']['missing'] == ['RefCOCO']

  with open(paths[1]) as f:
    markdown = f.read()
  for name in result['datasets']:
    assert f'| {name} |' in markdown
  assert '| OK-VQA | vqa | IND | 11.00 | 1 | 1000 | 0.10 |' in markdown
  assert '| MyCaps | captioning | custom | 50.00 |' in markdown
  assert '| classification | 5.50 | 10/10 |' in markdown
  assert '| overall | – | 35/36 |' in markdown
  assert 'missing: overall: RefCOCO' in markdown and 'missing: OOD: RefCOCO' in markdown

  with open(paths[2], 'rb') as f:
    assert f.read(8) == PNG_SIGNATURE


def test_write_report_refuses_scores_that_do_not_match_the_aggregate(tmp_path):
  scores = {'OK-VQA': _score(0.1)}
  with pytest.raises(ValueError, match='P@1'):
    write_report(str(tmp_path), scores, aggregate({'OK-VQA': 0.2}), {})
  with pytest.raises(ValueError, match='missing from aggregate_output'):
    write_report(str(tmp_path), {**scores, 'X': _score(0.3)}, aggregate({'OK-VQA': 0.1}), {})


def test_mean_cosine_sees_collapse():
  assert mean_cosine(np.array([E1, E1, E1])) == 1.0  # every embedding the same
  assert mean_cosine(np.array([E1, E2])) == 0.0
  assert mean_cosine(np.array([E1, [-1.0, 0.0]])) == -1.0
