(define (problem plan_trial_T20260101_000003_000001)
    (:domain alfred)
    (:objects
        agent1 - agent
        AlarmClockType - otype
        BookType - otype
        DeskLampType - otype
        KeyChainType - otype
        BedType - rtype
        DrawerType - rtype
        DresserType - rtype
        GarbageCanType - rtype
        SideTableType - rtype
        Bed_bar__minus_01_dot_20_bar_00_dot_00_bar__plus_01_dot_60 - receptacle
        Dresser_bar__plus_02_dot_40_bar_00_dot_00_bar__minus_00_dot_60 - receptacle
        Drawer_bar__plus_02_dot_30_bar__plus_00_dot_40_bar__minus_00_dot_50 - receptacle
        GarbageCan_bar__minus_02_dot_20_bar_00_dot_00_bar__minus_01_dot_90 - receptacle
        SideTable_bar__plus_00_dot_90_bar_00_dot_00_bar__minus_02_dot_20 - receptacle
        Book_bar__minus_01_dot_10_bar__plus_00_dot_56_bar__plus_01_dot_55 - object
        DeskLamp_bar__plus_00_dot_85_bar__plus_00_dot_70_bar__minus_02_dot_15 - object
        AlarmClock_bar__plus_02_dot_35_bar__plus_00_dot_90_bar__minus_00_dot_62 - object
        KeyChain_bar__plus_02_dot_28_bar__plus_00_dot_42_bar__minus_00_dot_48 - object
        loc_bar_2_bar_2_bar_1_bar_30 - location
        loc_bar__minus_3_bar_5_bar_3_bar_45 - location
        loc_bar_8_bar__minus_2_bar_1_bar_45 - location
        loc_bar_7_bar__minus_2_bar_1_bar_60 - location
        loc_bar__minus_7_bar__minus_6_bar_2_bar_60 - location
        loc_bar_3_bar__minus_6_bar_2_bar_45 - location
        )
    (:init
        (= (total-cost) 0)
        (atLocation agent1 loc_bar_2_bar_2_bar_1_bar_30)
        (receptacleType Bed_bar__minus_01_dot_20_bar_00_dot_00_bar__plus_01_dot_60 BedType)
        (receptacleAtLocation Bed_bar__minus_01_dot_20_bar_00_dot_00_bar__plus_01_dot_60 loc_bar__minus_3_bar_5_bar_3_bar_45)
        (receptacleType Dresser_bar__plus_02_dot_40_bar_00_dot_00_bar__minus_00_dot_60 DresserType)
        (receptacleAtLocation Dresser_bar__plus_02_dot_40_bar_00_dot_00_bar__minus_00_dot_60 loc_bar_8_bar__minus_2_bar_1_bar_45)
        (receptacleType Drawer_bar__plus_02_dot_30_bar__plus_00_dot_40_bar__minus_00_dot_50 DrawerType)
        (receptacleAtLocation Drawer_bar__plus_02_dot_30_bar__plus_00_dot_40_bar__minus_00_dot_50 loc_bar_7_bar__minus_2_bar_1_bar_60)
        (openable Drawer_bar__plus_02_dot_30_bar__plus_00_dot_40_bar__minus_00_dot_50)
        (receptacleType GarbageCan_bar__minus_02_dot_20_bar_00_dot_00_bar__minus_01_dot_90 GarbageCanType)
        (receptacleAtLocation GarbageCan_bar__minus_02_dot_20_bar_00_dot_00_bar__minus_01_dot_90 loc_bar__minus_7_bar__minus_6_bar_2_bar_60)
        (receptacleType SideTable_bar__plus_00_dot_90_bar_00_dot_00_bar__minus_02_dot_20 SideTableType)
        (receptacleAtLocation SideTable_bar__plus_00_dot_90_bar_00_dot_00_bar__minus_02_dot_20 loc_bar_3_bar__minus_6_bar_2_bar_45)
        (objectType Book_bar__minus_01_dot_10_bar__plus_00_dot_56_bar__plus_01_dot_55 BookType)
        (inReceptacle Book_bar__minus_01_dot_10_bar__plus_00_dot_56_bar__plus_01_dot_55 Bed_bar__minus_01_dot_20_bar_00_dot_00_bar__plus_01_dot_60)
        (objectAtLocation Book_bar__minus_01_dot_10_bar__plus_00_dot_56_bar__plus_01_dot_55 loc_bar__minus_3_bar_5_bar_3_bar_45)
        (pickupable Book_bar__minus_01_dot_10_bar__plus_00_dot_56_bar__plus_01_dot_55)
        (moveable Book_bar__minus_01_dot_10_bar__plus_00_dot_56_bar__plus_01_dot_55)
        (objectType DeskLamp_bar__plus_00_dot_85_bar__plus_00_dot_70_bar__minus_02_dot_15 DeskLampType)
        (inReceptacle DeskLamp_bar__plus_00_dot_85_bar__plus_00_dot_70_bar__minus_02_dot_15 SideTable_bar__plus_00_dot_90_bar_00_dot_00_bar__minus_02_dot_20)
        (objectAtLocation DeskLamp_bar__plus_00_dot_85_bar__plus_00_dot_70_bar__minus_02_dot_15 loc_bar_3_bar__minus_6_bar_2_bar_45)
        (toggleable DeskLamp_bar__plus_00_dot_85_bar__plus_00_dot_70_bar__minus_02_dot_15)
        (objectType AlarmClock_bar__plus_02_dot_35_bar__plus_00_dot_90_bar__minus_00_dot_62 AlarmClockType)
        (inReceptacle AlarmClock_bar__plus_02_dot_35_bar__plus_00_dot_90_bar__minus_00_dot_62 Dresser_bar__plus_02_dot_40_bar_00_dot_00_bar__minus_00_dot_60)
        (objectAtLocation AlarmClock_bar__plus_02_dot_35_bar__plus_00_dot_90_bar__minus_00_dot_62 loc_bar_8_bar__minus_2_bar_1_bar_45)
        (pickupable AlarmClock_bar__plus_02_dot_35_bar__plus_00_dot_90_bar__minus_00_dot_62)
        (moveable AlarmClock_bar__plus_02_dot_35_bar__plus_00_dot_90_bar__minus_00_dot_62)
        (objectType KeyChain_bar__plus_02_dot_28_bar__plus_00_dot_42_bar__minus_00_dot_48 KeyChainType)
        (inReceptacle KeyChain_bar__plus_02_dot_28_bar__plus_00_dot_42_bar__minus_00_dot_48 Drawer_bar__plus_02_dot_30_bar__plus_00_dot_40_bar__minus_00_dot_50)
        (objectAtLocation KeyChain_bar__plus_02_dot_28_bar__plus_00_dot_42_bar__minus_00_dot_48 loc_bar_7_bar__minus_2_bar_1_bar_60)
        (pickupable KeyChain_bar__plus_02_dot_28_bar__plus_00_dot_42_bar__minus_00_dot_48)
        (moveable KeyChain_bar__plus_02_dot_28_bar__plus_00_dot_42_bar__minus_00_dot_48)
        (canContain DrawerType BookType)
        (canContain DrawerType KeyChainType)
        (canContain BedType BookType)
        (canContain SideTableType BookType)
        (canContain SideTableType KeyChainType)
        (canContain SideTableType AlarmClockType)
        (canContain DresserType BookType)
        (canContain DresserType KeyChainType)
        (canContain DresserType AlarmClockType)
        )

    (:goal
        (and
            (exists (?ot - object ?a - agent ?l - location ?r - receptacle)
                (and
                    (objectType ?ot DeskLampType)
                    (toggleable ?ot)
                    (isToggled ?ot)
                    (receptacleAtLocation ?r ?l)
                    (atLocation ?a ?l)
                    (inReceptacle ?ot ?r)
                )
            )
            (exists (?o - object ?a - agent)
                (and
                    (objectType ?o BookType)
                    (holds ?a ?o)
                )
            )
        )
    )
)
